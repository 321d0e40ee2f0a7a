"""Compressed updates (COMPRESSION): the delta w - w_t sent as fewer bytes, decoded on arrival.

What is compressed is the delta from the base model the worker trained from, never
the weights (the top-k of raw weights would drop most of the model). The aggregator
adds the decoded delta to its copy of that base version, so the rule and the
`validate` stage after it see float32 weights as without compression.

The codecs, as pure functions on one tensor x (float32):

- fp16: x cast to IEEE half precision; relative error <= 2^-11 within its range
  (|x| <= 65504; beyond, infinity, which the aggregator refuses).
- int8: symmetric per-tensor scale s = max|x| / 127, q = round(x / s) in [-127, 127],
  decoded x' = q s, so |x - x'| <= s / 2. With a generator, stochastic rounding
  q = floor(x / s + u), u ~ U[0, 1), unbiased: E[x'] = x (Alistarh et al. 2017, QSGD).
- topk: the k = ceil(COMPRESSION_TOPK x size) entries of largest |x| of each tensor,
  their values in half precision as fp16 sends them; the others are 0 (Aji and
  Heafield 2017; layer-wise as in Lin et al. 2018, "Deep Gradient Compression",
  arXiv:1712.01887). The ascending flat indices i_0 < i_1 < ... travel as uint16 gaps
  g_0 = i_0, g_j = i_j - i_{j-1}; a gap above 65535 is bridged by filler entries of
  gap 65535 and value 0, so i_j = cumsum(g)_j and a filler adds nothing. An entry
  costs 4 bytes; fillers are at most size // 65535 per tensor.

Error feedback (topk): what a client did not send is added to its next delta,
acc = delta + e, sent = C(acc), e <- acc - sent (Stich, Cordonnier, Jaggi,
"Sparsified SGD with Memory", NeurIPS 2018; Lin et al. 2018), where sent holds the
half-precision values as the aggregator adds them, saturated at ±65504 (an entry
beyond it sends 65504 and keeps the rest in e, where infinity would have its update
refused, and with it the client's every later one). A float32 and its fp16 rounding
are within a factor of 2 of each other, so acc - sent is exact (Sterbenz's lemma; a
saturated entry too while |acc| < 2^29, as 65504 is a multiple of 32) and sent + e =
acc bit for bit: the rounding is not lost, only delayed, like the entries not kept.
The residual e follows the logical client whichever worker trains it
(`residuals.Residuals`, a folder shared by the workers).

On the wire (safetensors): fp16 sends each tensor as F16 under its own name; int8
sends `<name>` as I8 and `<name>:scale` as an F32 scalar; topk sends `<name>:index`
(U16 gaps) and `<name>:value` (F16). The upload's metadata says `codec` (`WIRE_NAMES`:
topk's is `topk16`; the earlier form, `topk` with I32 indices and F32 values, is
refused by name). The aggregator re-checks every bound a codec has: exact names,
dtypes and shapes, int8 codes in [-127, 127], scales finite and <= MAX_WEIGHT / 127;
top-k's gaps >= 1 after the first (indices strictly increase), the last index inside
the tensor, at most k + size // 65535 entries, values finite; any breach is `Rejected`
naming the tensor (a 422).

With DP the order is clip -> noise -> compress: the codec sees the clipped, noised
delta, so the privacy guarantee is untouched (post-processing); under DP=central the
aggregator clips the decoded delta again, which bounds a top-k update that error
feedback made longer than DP_CLIP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import numpy as np

from fedsim import weights
from fedsim.pipeline.base import Outgoing, Rejected, Stage, Tensors, Upload
from fedsim.pipeline.checks import MAX_WEIGHT
from fedsim.pipeline.residuals import Residuals
from fedsim.settings import ConfigError

CODECS = ("none", "fp16", "int8", "topk")
# The codec's name in an upload's metadata. Top-k's is named for its wire form (uint16
# gaps, float16 values); workers and aggregator ship together, so only this form is read.
WIRE_NAMES = {"fp16": "fp16", "int8": "int8", "topk": "topk16"}
EARLIER_TOPK = "topk"  # top-k's earlier wire form (int32 indices, float32 values): refused
SCALE, INDEX, VALUE = ":scale", ":index", ":value"  # suffixes of a codec's extra tensors
MAX_SCALE = MAX_WEIGHT / 127  # an int8 scale beyond it decodes past MAX_WEIGHT
MAX_GAP = 65535  # the largest uint16 gap; a longer one is bridged by filler entries
MAX_HALF = 65504.0  # the largest finite float16
DTYPES = {
    "fp16": frozenset({"F16"}),
    "int8": frozenset({"I8", "F32"}),
    "topk": frozenset({"U16", "F16"}),
}
# The dtypes an upload's header may hold: the codec's, and for topk I32 as well, so that
# an upload of the earlier form reaches `Compress.decode` and is refused by name, not
# for a dtype alone (the codec's own check still takes exactly U16 and F16).
HEADER_DTYPES = {**DTYPES, "topk": DTYPES["topk"] | {"I32"}}

# --- codecs: pure functions on one float32 tensor -----------------------------------------


def fp16_encode(x: np.ndarray) -> np.ndarray:
    """x in half precision (float16); beyond ±65504, infinity, which the aggregator refuses."""
    with np.errstate(over="ignore"):  # the overflow is the aggregator's to refuse, by name
        return np.asarray(x, np.float32).astype(np.float16)


def fp16_decode(h: np.ndarray) -> np.ndarray:
    return np.asarray(h, np.float16).astype(np.float32)


def int8_encode(
    x: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.float32]:
    """(q, s): s = max|x| / 127, q = round(x / s) (with `rng`: floor(x / s + u)), int8."""
    x = np.asarray(x, np.float32)
    s = np.float32(np.abs(x).max(initial=0.0) / 127)
    if s == 0:
        return np.zeros(x.shape, np.int8), np.float32(0)
    scaled = x.astype(np.float64) / float(s)
    q = np.floor(scaled + rng.random(x.shape)) if rng is not None else np.rint(scaled)
    return np.clip(q, -127, 127).astype(np.int8), s


def int8_decode(q: np.ndarray, s: float) -> np.ndarray:
    """x' = q s, float32."""
    return (np.asarray(q, np.float32) * np.float32(s)).astype(np.float32)


def kept(fraction: float, size: int) -> int:
    """k = ceil(fraction x size), at least 1, at most size (rounded to 9 places first, so
    that 0.01 x 200 keeps 2 and not 3)."""
    return min(size, max(1, math.ceil(round(fraction * size, 9))))


def topk_indices(x: np.ndarray, fraction: float) -> np.ndarray:
    """The flat indices of the k entries of largest |x|, ascending (int32)."""
    flat = np.asarray(x, np.float32).ravel()
    k = kept(fraction, flat.size)
    return np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]).astype(np.int32)


def topk_encode(x: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values): `topk_indices` and their values in half precision (`fp16_encode`:
    beyond ±65504, infinity; `feedback` saturates instead)."""
    idx = topk_indices(x, fraction)
    return idx, fp16_encode(np.asarray(x, np.float32).ravel()[idx])


def topk_decode(idx: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The dense float32 tensor of `shape`: `values` at flat `idx`, 0 elsewhere."""
    flat = np.zeros(math.prod(shape), np.float32)
    flat[np.asarray(idx, np.int64)] = np.asarray(values, np.float32)
    return flat.reshape(shape)


def feedback(
    delta: Tensors, residual: Tensors | None, fraction: float
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Top-k with error feedback: acc = delta + e, sent = topk(acc) in half precision,
    saturated at ±MAX_HALF, e' = acc - sent, so that sent + e' = acc exactly (module doc).
    Returns ({name: (indices, float16 values)}, e')."""
    sent, left = {}, {}
    for name, d in delta.items():
        acc = np.asarray(d, np.float32) + (residual[name] if residual else np.float32(0))
        idx = topk_indices(acc, fraction)
        rest = acc.ravel().copy()
        values = fp16_encode(np.clip(rest[idx], -MAX_HALF, MAX_HALF))
        rest[idx] -= values.astype(np.float32)  # exact: what was sent; its rounding stays
        sent[name], left[name] = (idx, values), rest.reshape(acc.shape)
    return sent, left


def gaps_encode(idx: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The wire form of ascending flat indices and their values: (uint16 gaps, float16
    values), g_0 = i_0, g_j = i_j - i_{j-1}, each gap above MAX_GAP preceded by filler
    entries of gap MAX_GAP and value 0 (one for every MAX_GAP it exceeds, rounded up)."""
    idx = np.asarray(idx, np.int64)
    steps = np.diff(idx, prepend=0)
    fillers = np.where(steps > 0, (steps - 1) // MAX_GAP, 0)  # the remainder is 1..MAX_GAP
    at = np.arange(idx.size) + np.cumsum(fillers)  # where each kept entry lands
    gaps = np.full(idx.size + int(fillers.sum()), MAX_GAP, np.uint16)
    out = np.zeros(gaps.size, np.float16)
    gaps[at], out[at] = steps - fillers * MAX_GAP, fp16_encode(values)
    return gaps, out


def gaps_decode(gaps: np.ndarray) -> np.ndarray:
    """The flat indices (int64) of uint16 gaps: their running sum."""
    return np.cumsum(np.asarray(gaps, np.int64))


# --- the wire form of a whole delta ---------------------------------------------------------


def encode(codec: str, delta: Tensors, fraction: float = 1.0) -> dict[str, np.ndarray]:
    """The tensors a push sends for `delta` (no error feedback: see `feedback`)."""
    if codec == "topk":
        return wire_topk({n: topk_encode(d, fraction) for n, d in delta.items()})
    out: dict[str, np.ndarray] = {}
    for name, d in delta.items():
        if codec == "fp16":
            out[name] = fp16_encode(d)
        elif codec == "int8":
            out[name], out[name + SCALE] = int8_encode(d)
        else:
            raise ValueError(f"unknown codec {codec!r}: one of {', '.join(CODECS[1:])}")
    return out


def wire_topk(sent: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """`<name>:index` (uint16 gaps) and `<name>:value` (float16) for each sent tensor."""
    out: dict[str, np.ndarray] = {}
    for name, (idx, values) in sent.items():
        out[name + INDEX], out[name + VALUE] = gaps_encode(idx, values)
    return out


def decode(
    codec: str, wire: Tensors, layout: weights.Layout, fraction: float = 1.0
) -> dict[str, np.ndarray]:
    """The float32 delta `wire` holds, every bound of `codec` checked; raises Rejected."""
    expected = {
        "fp16": lambda n: [n],
        "int8": lambda n: [n, n + SCALE],
        "topk": lambda n: [n + INDEX, n + VALUE],
    }[codec]
    names = {w for name, _ in layout for w in expected(name)}
    missing, extra = sorted(names - set(wire)), sorted(set(wire) - names)
    if missing or extra:
        raise Rejected(
            f"wrong tensor names for COMPRESSION={codec}: missing {missing[:4]}, "
            f"unexpected {[weights.quote(e, 40) for e in extra[:4]]}"
        )
    out = {}
    for name, shape in layout:
        if codec == "fp16":
            out[name] = fp16_decode(_array(wire, name, np.float16, shape))
        elif codec == "int8":
            out[name] = _int8(wire, name, shape)
        else:
            out[name] = _topk(wire, name, shape, fraction)
        if not np.isfinite(out[name]).all():
            raise Rejected(f"tensor {name} decodes to NaN or infinity", name)
    return out


def _array(wire: Tensors, key: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    tensor = wire[key]
    if tensor.dtype != dtype:
        raise Rejected(f"tensor {key} is {tensor.dtype}, expected {np.dtype(dtype)}", key)
    if tensor.shape != tuple(shape):
        raise Rejected(f"tensor {key} has shape {tensor.shape}, expected {tuple(shape)}", key)
    return tensor


def _int8(wire: Tensors, name: str, shape: tuple[int, ...]) -> np.ndarray:
    q = _array(wire, name, np.int8, shape)
    s = float(_array(wire, name + SCALE, np.float32, ()))
    if not 0 <= s <= MAX_SCALE:  # NaN fails it too
        raise Rejected(
            f"tensor {name}{SCALE} is {s:.3g}: a scale must be in [0, {MAX_SCALE:.4g}]",
            name + SCALE,
        )
    if q.size and int(q.min()) < -127:
        raise Rejected(f"tensor {name} holds -128: int8 codes are in [-127, 127]", name)
    return int8_decode(q, s)


def _topk(wire: Tensors, name: str, shape: tuple[int, ...], fraction: float) -> np.ndarray:
    gaps, values = wire[name + INDEX], wire[name + VALUE]
    size, k = math.prod(shape), kept(fraction, math.prod(shape))
    most = k + size // MAX_GAP  # the kept entries and the fillers their gaps can need
    if gaps.dtype != np.uint16 or gaps.ndim != 1:
        raise Rejected(
            f"tensor {name}{INDEX} must be 1-D uint16 gaps, is {gaps.dtype} {gaps.shape}",
            name + INDEX,
        )
    if values.dtype != np.float16 or values.shape != gaps.shape:
        raise Rejected(
            f"tensor {name}{VALUE} must be float16 of shape {gaps.shape} like its gaps, "
            f"is {values.dtype} {values.shape}",
            name + VALUE,
        )
    if gaps.size > most:
        raise Rejected(
            f"tensor {name}{INDEX} holds {gaps.size} entries, at most {most} of {size} "
            f"({k} kept and {size // MAX_GAP} fillers)",
            name + INDEX,
        )
    zero = np.flatnonzero(gaps[1:] == 0)
    if zero.size:
        raise Rejected(
            f"tensor {name}{INDEX} has a gap of 0 at entry {int(zero[0]) + 1}: indices must "
            "strictly increase",
            name + INDEX,
        )
    idx = gaps_decode(gaps)
    if idx.size and int(idx[-1]) >= size:
        raise Rejected(
            f"tensor {name}{INDEX} reaches index {int(idx[-1])}, past its {size} entries",
            name + INDEX,
        )
    if not np.isfinite(values).all():
        raise Rejected(
            f"tensor {name}{VALUE} holds a value non-finite (beyond float16's ±65504)",
            name + VALUE,
        )
    return topk_decode(idx, values, shape)


# --- the stage --------------------------------------------------------------------------


class Compress(Stage):
    """Worker: the delta encoded with the run's codec (topk: with error feedback).
    Aggregator: the codec checked and decoded onto the update's base version."""

    name = "compress"
    wants_base = True  # the aggregator keeps recent versions: a delta is decoded onto its base

    def __init__(
        self,
        codec: str,
        layout: weights.Layout,
        *,
        fraction: float = 0.01,
        residuals: Residuals | None = None,
    ) -> None:
        if codec not in CODECS[1:]:
            raise ValueError(f"unknown codec {codec!r}: one of {', '.join(CODECS[1:])}")
        self.codec, self.layout, self.fraction = codec, layout, fraction
        self.residuals = residuals if residuals is not None else Residuals(None)
        self.dtypes = HEADER_DTYPES[codec]

    @classmethod
    def from_settings(cls, settings: Any) -> Self | None:
        codec = getattr(settings, "compression", "none")
        if codec == "none":
            return None
        from fedsim.models import SHAPES  # the layouts in plain Python, no TensorFlow

        folder = getattr(settings, "worker_state_dir", None)
        return cls(
            codec,
            SHAPES[settings.model],
            fraction=getattr(settings, "compression_topk", 0.01),
            residuals=Residuals(Path(folder) if codec == "topk" and folder else None),
        )

    # --- worker side -----------------------------------------------------------------

    def worker(self, update: Outgoing) -> Outgoing:
        delta = update.delta()
        if self.codec != "topk":
            wire = encode(self.codec, delta)
        else:
            task = update.task
            client, task_id = str(task.get("client", "")), str(task.get("id", ""))
            run, base = str(task.get("run") or ""), int(task.get("base_version", 0))
            residual = self.residuals.load(client, run, task_id, base, self.layout)
            sent, left = feedback(delta, residual, self.fraction)
            self.residuals.save(client, run, task_id, base, left, sent)
            wire = wire_topk(sent)
        meta = {**update.meta, "codec": WIRE_NAMES[self.codec]}
        return dataclasses.replace(update, tensors=wire, meta=meta)

    # --- aggregator side -------------------------------------------------------------

    def decode(self, tensors: Tensors, upload: Upload) -> Tensors:
        said, wanted = upload.meta.get("codec"), WIRE_NAMES[self.codec]
        if said != wanted:
            shown = "none" if said is None else weights.quote(said, 20)
            named = "" if wanted == self.codec else f" (codec {wanted})"
            earlier = (
                ": the earlier top-k form (int32 indices, float32 values), no longer read; "
                "workers of this version send uint16 gaps and float16 values"
                if said == EARLIER_TOPK and self.codec == "topk"
                else ""
            )
            raise Rejected(
                f"this run takes COMPRESSION={self.codec} updates{named}, the upload says "
                f"codec {shown}{earlier}"
            )
        delta = decode(self.codec, tensors, self.layout, self.fraction)
        base = upload.base()
        return {name: (np.asarray(base[name], np.float32) + d) for name, d in delta.items()}


def check_settings(s: Any) -> None:
    """Refuse COMPRESSION where it cannot be sound, in one line each."""
    codec = getattr(s, "compression", "none")
    if codec == "none":
        return
    if getattr(s, "secagg", False):
        raise ConfigError(
            "COMPRESSION",
            codec,
            "SECAGG masks each update over a field: a compressed update cannot be masked and "
            "summed; set COMPRESSION=none",
        )
