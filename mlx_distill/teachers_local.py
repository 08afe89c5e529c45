"""Teachers computed during training: a local MLX checkpoint (dense logits or top-k on the fly),
and on-policy distillation (GKD): the student samples completions that the teacher then scores.

* :class:`LocalTeacher` runs any checkpoint :func:`mlx_distill.checkpoint.load_checkpoint` reads,
  in-process, on each batch's inputs. ``top_k == 0`` adds ``teacher_logits`` (the dense KL / JSD
  path of :func:`mlx_distill.losses.kd_loss`); ``top_k > 0`` replaces ``top_ids``/``top_logprobs``
  with the teacher's k most likely tokens (the sparse path, tail bucket included). Either way the
  teacher has a distribution at every supervised position, so ``kd_mask = loss_mask``. Teacher
  and student must share the tokenizer (same vocabulary fingerprint); vocabulary sizes may differ
  only by padding past the tokenizer's last id.
* :class:`OnPolicy` replaces, with probability ``fraction`` (λ) per micro-batch, every row's
  completion with one the student samples for the row's prompt. The samples are then scored by the
  local teacher (as any batch), or by a teacher server's ``POST /v1/score`` (:class:`RemoteScorer`,
  :mod:`mlx_distill.teacher.server`), which also must use the student's tokenizer: the sampled ids
  are sent as ``completion_ids`` and the returned top-k ids are used as they are. Sampled rows
  carry no tool-span marks, so ``loss.tool_weight`` does not apply to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_distill.checkpoint import load_checkpoint
from mlx_distill.cli import UserError


class TeacherError(UserError):
    """The teacher cannot be used with this student; one line naming the field and the fix."""


def _fingerprint(tokenizer: Any) -> str:
    from mlx_distill.data.vocab import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer)


class LocalTeacher:
    def __init__(self, model_dir: str | Path, student_tokenizer: Any, student_vocab_size: int,
                 top_k: int = 0, compile: bool = True):
        from mlx_distill.tokenizer import TokenizerError, load_tokenizer

        self.model_dir = Path(model_dir)
        try:
            teacher_tokenizer = load_tokenizer(self.model_dir)
        except TokenizerError as exc:
            raise TeacherError(f"teacher.model: {exc}; a local teacher needs the student's "
                               "tokenizer files in its checkpoint dir") from None
        if _fingerprint(teacher_tokenizer) != _fingerprint(student_tokenizer):
            raise TeacherError(f"teacher.model: {self.model_dir} has a different tokenizer than "
                               "the student; a local teacher must share the student's vocabulary "
                               "(distill from other tokenizers offline: KD records are aligned "
                               "by text)")
        self.model = load_checkpoint(self.model_dir)
        self.model.freeze()
        self.model.eval()
        self.top_k = top_k
        self.vocab_size = student_vocab_size
        tokens = len(student_tokenizer.get_vocab())
        teacher_vocab = self.model.config.vocab_size
        if min(teacher_vocab, student_vocab_size) < tokens:
            raise TeacherError(f"teacher.model: vocab_size {teacher_vocab} (teacher) / "
                               f"{student_vocab_size} (student) is smaller than the tokenizer's "
                               f"{tokens} tokens")
        if top_k > student_vocab_size:
            raise TeacherError(f"teacher.top_k: {top_k} exceeds the vocabulary "
                               f"({student_vocab_size})")
        forward = self._logits
        state = [self.model.state]  # an output too: see mlx_distill.train.make_grad_fn
        self._forward = mx.compile(forward, inputs=state, outputs=state) if compile else forward

    def _logits(self, inputs: mx.array) -> mx.array:
        logits = self.model(inputs).astype(mx.float32)
        extra = self.vocab_size - logits.shape[-1]
        # Ids past the tokenizer are padding in one of the two vocabularies: cut or pad (-inf:
        # zero probability) so teacher and student logits line up id for id.
        if extra < 0:
            return logits[..., : self.vocab_size]
        if extra > 0:
            pad = mx.full((*logits.shape[:-1], extra), -mx.inf, dtype=logits.dtype)
            return mx.concatenate([logits, pad], axis=-1)
        return logits

    def annotate(self, batch: dict[str, mx.array]) -> dict[str, mx.array]:
        """``batch`` with the teacher's distribution at every supervised position."""
        logits = mx.stop_gradient(self._forward(batch["inputs"]))
        out = {k: v for k, v in batch.items() if k not in ("top_ids", "top_logprobs")}
        out["kd_mask"] = batch["loss_mask"]
        if self.top_k == 0:
            out["teacher_logits"] = logits
            return out
        ids, logprobs = top_k_logprobs(logits, self.top_k)
        out["top_ids"], out["top_logprobs"] = ids, logprobs
        return out


def top_k_logprobs(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The ``k`` most likely ids per position and their log-probabilities (unsorted)."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    return ids.astype(mx.int32), mx.take_along_axis(logprobs, ids, axis=-1)


class RemoteScorer:
    """Scores student samples with a teacher server (``POST {url}/score``)."""

    def __init__(self, url: str, top_logprobs: int, timeout_s: float, student_vocab: Any):
        import httpx

        self.url = url.rstrip("/") + "/score"
        self.top_logprobs = top_logprobs
        self.vocab = student_vocab
        self.client = httpx.Client(timeout=timeout_s)

    def score(self, messages: list, tools: list | None, prompt_len: int,
              completion_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(top_ids, top_logprobs)``, each ``(len(completion_ids), top_logprobs)``."""
        import httpx

        body = {"messages": messages, "completion_ids": [int(t) for t in completion_ids],
                "top_logprobs": self.top_logprobs}
        if tools:
            body["tools"] = tools
        try:
            response = self.client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise TeacherError(f"teacher.remote_url: POST {self.url} failed ({exc})") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise TeacherError(f"teacher.remote_url: POST {self.url} answered "
                               f"{response.status_code}: {message}")
        data = response.json()
        tokens = data.get("tokens") or []
        if data.get("usage", {}).get("prompt_tokens") != prompt_len or len(tokens) != len(
            completion_ids
        ):
            raise TeacherError(f"teacher.remote_url: the server tokenized the prompt into "
                               f"{data.get('usage', {}).get('prompt_tokens')} tokens, the student "
                               f"into {prompt_len}; on-policy scoring needs the same tokenizer "
                               "and chat template")
        k = self.top_logprobs
        ids = np.zeros((len(tokens), k), dtype=np.int32)
        logprobs = np.full((len(tokens), k), -np.inf, dtype=np.float32)
        for i, token in enumerate(tokens):
            for j, alt in enumerate((token.get("top_logprobs") or [])[:k]):
                if bytes(alt.get("bytes") or []) != self.vocab.bytes_of(int(alt["id"])):
                    raise TeacherError(f"teacher.remote_url: token id {alt['id']} means "
                                       f"{bytes(alt.get('bytes') or [])!r} to the server but "
                                       f"{self.vocab.bytes_of(int(alt['id']))!r} to the "
                                       "student; on-policy scoring needs the same tokenizer")
                ids[i, j], logprobs[i, j] = int(alt["id"]), float(alt["logprob"])
        return ids, logprobs

    def close(self) -> None:
        self.client.close()


class OnPolicy:
    """GKD-style on-policy batches: the student's own samples for the batch's prompts."""

    def __init__(self, student: Any, tokenizer: Any, fraction: float, max_new_tokens: int,
                 temperature: float, seed: int, pad_id: int,
                 remote: RemoteScorer | None = None,
                 conversation: Callable[[str], tuple[list, list | None]] | None = None):
        self.student, self.tokenizer = student, tokenizer
        self.fraction, self.max_new_tokens, self.temperature = fraction, max_new_tokens, temperature
        self.seed, self.pad_id = seed, pad_id
        self.remote, self.conversation = remote, conversation
        if remote is not None and conversation is None:
            raise ValueError("remote scoring needs the conversation (messages, tools) of each row")

    def chosen(self, step: int, micro: int) -> bool:
        """Whether micro-batch ``micro`` of ``step`` is on-policy: a pure function of the seed,
        so a resumed run makes the same choices."""
        if self.fraction <= 0:
            return False
        return bool(np.random.default_rng([self.seed, 0x6BD, step, micro]).random()
                    < self.fraction)

    def sample(self, prompt: list[int], max_new: int) -> list[int]:
        from mlx_distill.generate import generate

        tokens = generate(self.student, self.tokenizer, prompt, max_tokens=max_new,
                          temperature=self.temperature)
        return [t.token for t in tokens]

    def resample(self, batch: dict[str, mx.array], rows: Sequence[Any]) -> dict[str, mx.array]:
        """Every row with a prompt gets a student completion; rows without one stay empty."""
        inputs = np.array(batch["inputs"])
        loss_mask = np.array(batch["loss_mask"])
        n_rows, length = inputs.shape
        k = self.remote.top_logprobs if self.remote is not None else 1
        out = {
            "inputs": np.full((n_rows, length), self.pad_id, np.int32),
            "targets": np.full((n_rows, length), self.pad_id, np.int32),
            "loss_mask": np.zeros((n_rows, length), np.float32),
            "kd_mask": np.zeros((n_rows, length), np.float32),
            "tool_mask": np.zeros((n_rows, length), np.float32),
            "top_ids": np.zeros((n_rows, length, k), np.int32),
            "top_logprobs": np.full((n_rows, length, k), -np.inf, np.float32),
        }
        was_training = self.student.training
        self.student.eval()
        try:
            for r in range(n_rows):
                supervised = np.flatnonzero(loss_mask[r])
                if supervised.size == 0:
                    continue
                prompt_len = int(supervised[0]) + 1
                max_new = min(self.max_new_tokens, length + 1 - prompt_len)
                if max_new < 1:
                    continue
                prompt = inputs[r, :prompt_len].tolist()
                sample = self.sample(prompt, max_new)
                ids = np.array(prompt + sample, np.int32)
                n = len(ids) - 1
                out["inputs"][r, :n], out["targets"][r, :n] = ids[:-1], ids[1:]
                out["loss_mask"][r, prompt_len - 1:n] = 1.0
                if self.remote is not None:
                    try:
                        messages, tools = self.conversation(rows[r].id)
                    except KeyError:
                        raise TeacherError(f"teacher.remote_url: no conversation for example "
                                           f"{rows[r].id!r} in the data files") from None
                    top_ids, top_lp = self.remote.score(messages, tools, prompt_len, sample)
                    out["top_ids"][r, prompt_len - 1:n] = top_ids
                    out["top_logprobs"][r, prompt_len - 1:n] = top_lp
                    out["kd_mask"][r, prompt_len - 1:n] = 1.0
        finally:
            self.student.train(was_training)
        return {key: mx.array(value) for key, value in out.items()}
