"""Routing traces: which experts each token chose in every MoE layer, as JSON Lines.

Line 1 is the header: ``{"format": "expertswap-trace/1", "model", "family", "layers" (the MoE layer
numbers), "experts" (per layer), "top_k", "tokenizer", "expert_bytes" (optional)}``. Then one line per
token: ``{"position", "phase" ("prefill" or "decode"), "step" (the forward it ran in), "experts": {layer:
[ids]}, "weights": {layer: [routing weights]}, "predicted": {layer: [ids]}}``, ids in the router's order.
``step`` groups the tokens of one forward (a prompt runs as one); a trace from another engine may leave it
out (each token its own forward). ``predicted`` (optional) is what layer L+1's router picks from layer L's
hidden state: the prefetch predictor's guess.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from expertswap.protocol.errors import ExpertSwapError

FORMAT = "expertswap-trace/1"
PHASES = ("prefill", "decode")


class TraceError(ExpertSwapError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class TraceHeader:
    model: str
    family: str
    layers: list[int]
    experts: int
    top_k: int
    tokenizer: str | None = None
    expert_bytes: int | None = None  # one expert's weights, when known: replays report bytes moved
    format: str = FORMAT


@dataclass(frozen=True)
class TraceToken:
    position: int
    phase: str
    step: int
    experts: dict[int, list[int]]
    weights: dict[int, list[float]]
    predicted: dict[int, list[int]] = field(default_factory=dict)


def read_trace(path: str | Path) -> tuple[TraceHeader, list[TraceToken]]:
    """The header and every token of a trace file, or a ``TraceError`` naming the bad line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    if not lines:
        raise TraceError(f"{path}:1: empty file, expected a header line")
    header = _header(path, lines[0])
    tokens = [_token(path, n, line, header) for n, line in enumerate(lines[1:], start=2) if line.strip()]
    return header, tokens


def _json(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:{number}: not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise TraceError(f"{path}:{number}: expected a JSON object")
    return value


def _header(path: Path, line: str) -> TraceHeader:
    value = _json(path, 1, line)
    if value.get("format") != FORMAT:
        raise TraceError(f"{path}:1: not a trace header (format must be {FORMAT!r})")
    try:
        header = TraceHeader(model=str(value["model"]), family=str(value["family"]),
                             layers=[int(v) for v in value["layers"]], experts=int(value["experts"]),
                             top_k=int(value["top_k"]), tokenizer=value.get("tokenizer"),
                             expert_bytes=int(value["expert_bytes"]) if value.get("expert_bytes") else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{path}:1: bad header field {exc}") from None
    if not header.layers or header.experts < 1 or not 1 <= header.top_k <= header.experts:
        raise TraceError(f"{path}:1: the header needs layers, experts >= 1 and 1 <= top_k <= experts")
    return header


def _token(path: Path, number: int, line: str, header: TraceHeader) -> TraceToken:
    value = _json(path, number, line)
    try:
        experts = {int(k): [int(e) for e in v] for k, v in value["experts"].items()}
        weights = {int(k): [float(w) for w in v] for k, v in value.get("weights", {}).items()}
        predicted = {int(k): [int(e) for e in v] for k, v in value.get("predicted", {}).items()}
        token = TraceToken(position=int(value["position"]), phase=str(value["phase"]),
                           step=int(value.get("step", number)), experts=experts, weights=weights, predicted=predicted)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TraceError(f"{path}:{number}: bad token line ({type(exc).__name__}: {exc})") from None
    if token.phase not in PHASES:
        raise TraceError(f"{path}:{number}: phase must be prefill or decode, got {token.phase!r}")
    if sorted(experts) != sorted(header.layers):
        raise TraceError(f"{path}:{number}: experts are given for layers {sorted(experts)}, the header has "
                         f"{header.layers}")
    for layer, ids in experts.items():
        if not ids or any(not 0 <= e < header.experts for e in ids):
            raise TraceError(f"{path}:{number}: layer {layer} names experts outside 0..{header.experts - 1}: {ids}")
    return token


class TraceRecorder:
    """Writes a trace while the engine runs: layers note their routing as device tensors during a forward, and
    the forward's end reads them all in one transfer (no host sync per layer)."""

    def __init__(self, path: str | Path, header: TraceHeader) -> None:
        self.path = Path(path)
        try:
            self._file: IO[str] = self.path.open("w")
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot write the trace: {exc}") from None
        self._file.write(json.dumps(asdict(header)) + "\n")
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._guesses: list[tuple[int, torch.Tensor]] = []
        self.position = self.steps = 0

    def begin(self) -> None:
        """A forward (or its retry after an out-of-memory roll-back) starts: nothing of an earlier attempt stays."""
        self._pending.clear()
        self._guesses.clear()

    def note_guess(self, layer: int, index: torch.Tensor) -> None:
        """``index`` [T, k]: the experts predicted for ``layer`` from the previous MoE layer's hidden state."""
        self._guesses.append((layer, index.detach()))

    def note(self, layer: int, index: torch.Tensor, weights: torch.Tensor) -> None:
        self._pending.append((layer, index.detach(), weights.detach()))

    def end(self, is_prefill: bool) -> None:
        """The forward succeeded: one line per token it ran."""
        if not self._pending:
            return
        ids = torch.stack([index for _, index, _ in self._pending]).tolist()  # [layers, T, k]: one transfer
        weights = torch.stack([w.float() for _, _, w in self._pending]).tolist()
        layers = [layer for layer, _, _ in self._pending]
        guessed = [layer for layer, _ in self._guesses]
        guesses = torch.stack([g for _, g in self._guesses]).tolist() if self._guesses else []
        self._pending.clear()
        self._guesses.clear()
        if is_prefill:
            self.position = 0
        rows = len(ids[0])
        for row in range(rows):
            line = {"position": self.position + row, "phase": "prefill" if is_prefill else "decode",
                    "step": self.steps, "experts": {str(layer): ids[i][row] for i, layer in enumerate(layers)},
                    "weights": {str(layer): [round(w, 6) for w in weights[i][row]] for i, layer in enumerate(layers)}}
            if guessed:
                line["predicted"] = {str(layer): guesses[i][row] for i, layer in enumerate(guessed)}
            self._file.write(json.dumps(line) + "\n")
        self.position += rows
        self.steps += 1

    def close(self) -> None:
        self._file.close()


def steps(tokens: list[TraceToken]) -> Iterator[list[TraceToken]]:
    """The tokens grouped by the forward they ran in, in order."""
    group: list[TraceToken] = []
    for token in tokens:
        if group and token.step != group[-1].step:
            yield group
            group = []
        group.append(token)
    if group:
        yield group


def hook_router_guesses(recorder: TraceRecorder, routers: Sequence[nn.Module | None], layers: Sequence[int],
                        top_k: int) -> list[RemovableHandle]:
    """Hooks on each MoE layer's router that run the next layer's router on this layer's input: the prefetch
    predictor's guess, noted in the trace beside what the next layer then chose. Remove them when done."""
    return [here.register_forward_hook(_guess_next(recorder, following, layer, top_k))
            for (here, following), layer in zip(itertools.pairwise(routers), layers[1:], strict=True)
            if here is not None and following is not None]


def _guess_next(recorder: TraceRecorder, following: nn.Module, layer: int,
                k: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], object], None]:
    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: object) -> None:
        out = following.forward(inputs[0])  # forward, not __call__: the next router's own hooks stay quiet
        logits = out[0] if isinstance(out, tuple) else out
        if logits.is_floating_point():  # a router that returns ids first gives no guess
            recorder.note_guess(layer, logits.topk(k, dim=-1).indices.reshape(-1, k))

    return hook
