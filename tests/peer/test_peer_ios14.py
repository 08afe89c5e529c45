"""Apple's iOS14 op tests (from the installed coremltools), run through the interpreter."""

from peer_collect import import_apple_tests

import_apple_tests("iOS14", globals())
