"""The tool-call grammar on its own: which token sequences the llguidance matcher accepts, checked
against the chat template's own rendering and an independent validator (jsonschema plus the BFCL
type rules of our scorer)."""

from __future__ import annotations

import json

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from runtime_helpers import TOOLS, arguments_valid, block, make_tokenizer

from mlx_distill.runtime import ConstraintError, ToolGrammar, tool_call_grammar
from mlx_distill.runtime.constrain import arguments_schema, call_schema
from mlx_distill.tokenizer import SPECIAL_TOKENS, load_tokenizer

FUNCTIONS = {t["function"]["name"]: t["function"] for t in TOOLS}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("grammar_tok")))


@pytest.fixture(scope="module")
def grammars(tokenizer):
    cache = {}

    def get(tool_choice="auto", parallel=True, tools=None):
        key = (json.dumps(tool_choice), parallel, json.dumps(tools))
        if key not in cache:
            cache[key] = ToolGrammar(tokenizer, len(tokenizer), tools or TOOLS, tool_choice,
                                     parallel)
        return cache[key]

    return get


def accepts(grammar, tokenizer, text: str) -> bool:
    """The whole text, then the end-of-turn token, is a complete answer under the grammar."""
    mask = grammar.mask()
    ids = tokenizer.encode(text, add_special_tokens=False)
    for token in [*ids, tokenizer.eos_token_id]:
        if not mask.allowed()[token]:
            return False
        mask.advance(token)
    return True


def test_block_spelling_is_the_chat_templates(tokenizer):
    arguments = {"city": "zürich", "unit": "celsius"}
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"},
         {"role": "assistant", "tool_calls": [{"type": "function", "function": {
             "name": "get_weather", "arguments": arguments}}]}], tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n" + block("get_weather", arguments)
                             + "<|im_end|>\n")


def test_markers_are_special_tokens(grammars, tokenizer):
    grammar = grammars()
    assert grammar.special_markers
    assert "<tool_call>" in grammar.lark and '"<tool_call>' not in grammar.lark
    # The first token of a call can only be the special <tool_call> token, never '<' as text.
    mask = grammars("required").mask()
    assert mask.allowed().nonzero()[0].tolist() == [tokenizer.convert_tokens_to_ids("<tool_call>")]


# ---- arguments: accepted exactly when valid ----

def _any_value():
    return st.one_of(
        st.integers(-100, 6000), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
        st.sampled_from([3.0, -50, 5000, 5001, True, False, None, "celsius", "kelvin", "12:30",
                         "29:99", "7:05", "zurich", "Zurich", "", "abcdefghi", "zü", [1], {}]),
        st.text(alphabet="az09:ZüA \n\"\\", max_size=10),
    )


def _valid_value(schema: dict):
    """Values that fit one parameter schema of TOOLS."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "pattern" in schema:
        return st.from_regex(schema["pattern"].strip("^$"), fullmatch=True)
    return {"integer": st.integers(schema.get("minimum", -10**6), schema.get("maximum", 10**6)),
            "number": st.one_of(st.integers(-10**6, 10**6), st.floats(-1e9, 1e9,
                                                                      allow_nan=False)),
            "boolean": st.booleans()}[schema["type"]]


@st.composite
def calls(draw):
    """A tool and arguments in schema order (the grammar fixes the key order to the schema's):
    each parameter usually valid, sometimes wrong or left out, maybe an unknown one at the end."""
    name = draw(st.sampled_from(sorted(FUNCTIONS)))
    arguments = {}
    for key, schema in FUNCTIONS[name]["parameters"]["properties"].items():
        kind = draw(st.sampled_from(["valid"] * 6 + ["other", "missing"]))
        if kind != "missing":
            arguments[key] = draw(_valid_value(schema) if kind == "valid" else _any_value())
    if draw(st.integers(0, 5)) == 0:
        arguments["extra"] = draw(_any_value())
    return name, arguments


@settings(max_examples=300, deadline=None)
@given(call=calls())
def test_a_block_is_accepted_exactly_when_its_arguments_are_valid(grammars, tokenizer, call):
    name, arguments = call
    valid = arguments_valid(FUNCTIONS[name], arguments)
    event(f"valid: {valid}")
    assert accepts(grammars("required"), tokenizer, block(name, arguments)) == valid


@settings(max_examples=60, deadline=None)
@given(text=st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "<tool", "_call>", "<",
                                       ">", "a", " b", "\n", "{", '"', "ü", "<think>"]),
                     min_size=1, max_size=8).map("".join))
def test_plain_text_is_any_text_without_a_call_marker(grammars, tokenizer, text):
    """Text is free except for special tokens (such as </tool_call>, which the text tokenizes
    to) and the string <tool_call> however it is spelled."""
    special = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    plain = "<tool_call>" not in text and not special & set(tokenizer.encode(text))
    assert accepts(grammars("auto"), tokenizer, text) == plain
    assert accepts(grammars("none"), tokenizer, text) == plain


# ---- tool_choice and parallel calls ----

WEATHER = block("get_weather", {"city": "bern"})
ALARM = block("set_alarm", {"time": "07:30", "days": 7})


@pytest.mark.parametrize("choice, parallel, text, expected", [
    ("auto", True, "", True),
    ("auto", True, "It is sunny.", True),
    ("auto", True, WEATHER, True),
    ("auto", True, "Let me check.\n" + WEATHER, True),
    ("auto", True, WEATHER + "\n" + ALARM, True),
    ("auto", True, WEATHER + " trailing text", False),
    ("auto", False, WEATHER + "\n" + ALARM, False),
    ("required", True, "It is sunny.", False),
    ("required", True, "", False),
    ("required", True, WEATHER + "\n" + ALARM, True),
    ("required", False, ALARM, True),
    ("none", True, WEATHER, False),
    ("none", True, "plain", True),
    ({"type": "function", "function": {"name": "set_alarm"}}, True, ALARM, True),
    ({"type": "function", "function": {"name": "set_alarm"}}, True, WEATHER, False),
    # Spelling the template differently is refused: compact separators, other key order.
    ("required", True, '<tool_call>\n{"name":"get_weather","arguments":{"city":"bern"}}\n'
                       "</tool_call>", False),
    ("required", True, '<tool_call>\n{"arguments": {"city": "bern"}, "name": "get_weather"}\n'
                       "</tool_call>", False),
    ("required", True, block("get_weather", {"unit": "celsius", "city": "bern"}), False),
])
def test_tool_choice(grammars, tokenizer, choice, parallel, text, expected):
    assert accepts(grammars(choice, parallel), tokenizer, text) == expected


def test_arguments_schema_closes_objects_without_touching_the_tool():
    function = {"name": "f", "parameters": {"type": "object", "properties": {"a": {}}}}
    assert arguments_schema(function)["additionalProperties"] is False
    assert "additionalProperties" not in function["parameters"]
    open_schema = {"name": "g", "parameters": {"type": "object", "additionalProperties": True}}
    assert arguments_schema(open_schema)["additionalProperties"] is True
    assert arguments_schema({"name": "h"}) == {"type": "object", "properties": {},
                                               "additionalProperties": False}
    schema = call_schema([function])
    assert schema["anyOf"][0]["properties"]["name"] == {"const": "f"}


@pytest.mark.parametrize("tools, choice, message", [
    ([], "auto", "tools: expected a non-empty list"),
    ([{"type": "function", "function": {"description": "x"}}], "auto",
     "tools[0].function.name: expected a non-empty string"),
    ([TOOLS[0], TOOLS[0]], "auto", "tools[1].function.name: 'get_weather' is defined twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "auto",
     "tools[0].function.parameters: expected a JSON schema object"),
    (TOOLS, "sometimes", "tool_choice: expected one of"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "no tool named 'nope'"),
])
def test_bad_tools_name_the_field(tools, choice, message):
    with pytest.raises(ConstraintError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tool_call_grammar(tools, choice)


def test_a_schema_llguidance_cannot_enforce_names_the_tool(tokenizer):
    tools = [TOOLS[0], {"type": "function", "function": {"name": "neg", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}]
    with pytest.raises(ConstraintError, match=r"tools\[1\] \(neg\): .*not"):
        ToolGrammar(tokenizer, len(tokenizer), tools)


def test_model_vocabulary_may_exceed_the_tokenizers(tokenizer):
    grammar = ToolGrammar(tokenizer, len(tokenizer) + 40, TOOLS)
    allowed = grammar.mask().allowed()
    assert allowed.shape == (len(tokenizer) + 40,)
    assert not allowed[len(tokenizer):].any()  # ids past the tokenizer spell nothing
    with pytest.raises(ConstraintError, match="model's vocabulary only"):
        ToolGrammar(tokenizer, len(tokenizer) - 1, TOOLS)
