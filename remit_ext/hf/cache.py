"""The offline scorer cache: the frozen scorer's per-token log-probs over a tokenized dataset,
computed once (``remit-ext score-hf``), then joined to training batches.

The scorer depends only on the data, so its log-probs can be precomputed (METHODS.md section 2,
step 2), which removes the live scorer's forward from every training step.

Layout of ``DIR``:

- ``shard-00000.safetensors``, ... one file per ``shard_size`` consecutive sequences:
  ``logprobs`` float32 ``[tokens of the shard]`` (the sequences' entries concatenated),
  ``offsets`` int64 ``[n + 1]`` (sequence i is ``logprobs[offsets[i]:offsets[i + 1]]``),
  ``hashes`` uint8 ``[n, 16]`` (``sequence_hash`` of each sequence's token ids). Safetensors
  files are memory-mapped on read (``safe_open``), so a cache larger than RAM joins lazily.
- ``manifest.json``: the scorer (name, vocabulary, dtype, a fingerprint of its weights), the
  data source and column, ``shard_size``, and the finished shards. Shards and the manifest are
  written to a temporary file and renamed into place, so an interrupted run leaves only whole
  files; a re-run with the same scorer and data skips every shard already on disk (checked
  against the data's hashes, not trusted by name) and scores the rest.

Alignment: entry t of a sequence is the scorer's ``log p(x_t | x_<t)`` for t >= 1 and 0 at
t = 0, aligned with the sequence's tokens and so with ``labels``; the patched forward shifts it
as it shifts the labels. A position whose label is not the input token (or is -100) is not
scored against the cache's token, so labels must be ``input_ids`` or ``-100`` there.

Join: ``ScorerCacheDataset(dataset, cache)`` adds a ``scorer_logprobs`` field to each example
and checks the hash of its token ids against the cache: a dataset reordered, filtered or
re-tokenized after scoring raises ``ScorerCacheMismatchError`` instead of training on another
sequence's numbers (``join="hash"`` looks sequences up by hash instead of by index).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .._files import remove_stale_temps

__all__ = ["ReMiTDataCollator", "ScorerCache", "ScorerCacheDataset", "ScorerCacheMismatchError",
           "add_scorer_logprobs", "read_token_sequences", "score_dataset", "sequence_hash",
           "MANIFEST"]

MANIFEST = "manifest.json"
FORMAT = "remit_ext.scorer_cache"
VERSION = 1
ALIGNMENT = "label-aligned: entry 0 = 0, entry t = log p_scorer(x_t | x_<t)"


class ScorerCacheMismatchError(ValueError):
    """A dataset example and the cache entry it is joined to hold different token ids."""


def sequence_hash(ids) -> bytes:
    """16-byte BLAKE2b of a sequence's token ids (as little-endian int64; the length is in it)."""
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(ids, dtype="<i8"))
    if arr.ndim != 1:
        raise ValueError(f"token ids: expected one sequence (1-D), got shape {arr.shape}")
    return hashlib.blake2b(arr.tobytes(), digest_size=16).digest()


# ------------------------------------------------------------------------------ reading


def _is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in
                                 ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_token_sequences(path, column: str = "input_ids", split: Optional[str] = None
                         ) -> tuple[Iterator[list[int]], Optional[int]]:
    """(an iterator over the token-id lists, their number or None) of a tokenized dataset:

    - JSONL (``.jsonl`` / ``.json``): one sequence a line, ``{"input_ids": [...], ...}`` or a
      bare ``[...]``;
    - Parquet (``.parquet``, needs ``pyarrow``): the list column ``column``;
    - a ``datasets`` dataset saved with ``save_to_disk`` (needs ``datasets``; a
      ``DatasetDict`` needs ``split``).
    """
    path = Path(path)
    if _is_datasets_dir(path):
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"{path} is a `datasets` dataset on disk: pip install datasets "
                              "to read it (or export it to JSONL)") from e
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise ValueError(f"{path} is a DatasetDict with splits {list(ds)}: pass a split")
            ds = ds[split]
        if column not in ds.column_names:
            raise ValueError(f"{path}: no column {column!r} (columns: {ds.column_names})")
        ds = ds.select_columns([column])

        def gen_ds():
            for batch in ds.iter(batch_size=1024):
                yield from batch[column]
        return gen_ds(), len(ds)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{path} is Parquet: pip install pyarrow to read it") from e
        pf = pq.ParquetFile(str(path))
        if column not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {column!r} (columns: {pf.schema_arrow.names})")

        def gen_pq():
            for batch in pf.iter_batches(columns=[column], batch_size=1024):
                yield from batch.column(0).to_pylist()
        return gen_pq(), pf.metadata.num_rows
    if path.suffix in (".jsonl", ".json"):
        with open(path, "rb") as f:
            total = sum(1 for line in f if line.strip())

        def gen_jsonl():
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    ids = obj.get(column) if isinstance(obj, dict) else obj
                    if not isinstance(ids, list):
                        raise ValueError(f"{path}:{n}: expected a list of token ids (or an "
                                         f"object with {column!r}), got {type(ids).__name__}")
                    yield ids
        return gen_jsonl(), total
    raise ValueError(f"{path}: expected a .jsonl/.json file of token ids, a .parquet file, or a "
                     "directory written by datasets' save_to_disk")


# ------------------------------------------------------------------------------ writing


def _remove_stale_temps(path: Path) -> list[Path]:
    """Remove temporary files a killed writer of ``path`` left (our own pattern
    ``<name>.<pid>.<8 hex>.tmp``; ``_files.remove_stale_temps``)."""
    return remove_stale_temps(path, f"{path.name}.*.tmp",
                              re.escape(f"{path.name}.") + r"(\d+)\.[0-9a-f]{8}\.tmp")


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path), fsync, rename onto path: readers only ever see whole files."""
    _remove_stale_temps(path)
    # A name of this process's own: several ranks scoring at once must not share a temp file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1) + "\n"))


def _write_shard(path: Path, logprobs: list[np.ndarray], hashes: list[bytes],
                 meta: dict) -> None:
    from safetensors.numpy import save_file

    lengths = np.array([len(x) for x in logprobs], dtype=np.int64)
    offsets = np.zeros(len(logprobs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = (np.concatenate(logprobs).astype(np.float32) if logprobs
            else np.zeros(0, dtype=np.float32))
    tensors = {"logprobs": flat, "offsets": offsets,
               "hashes": np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, 16)}
    _atomic_write(path, lambda p: save_file(tensors, str(p),
                                            metadata={k: str(v) for k, v in meta.items()}))


def _read_shard_hashes(path: Path) -> Optional[list[bytes]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            h = f.get_tensor("hashes")
    except Exception:  # a foreign or damaged file: treat as missing
        return None
    return [bytes(row) for row in h]


def scorer_fingerprint(model) -> str:
    """A cheap, device-independent identity of a model's weights: names, shapes, dtypes and the
    first 64 values of every parameter (exact bytes). A resumed run refuses another scorer."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _batches(lengths: Sequence[int], batch_size: int, batch_tokens: Optional[int]):
    """Indices of one shard's sequences in batches, longest first (less padding), each at most
    batch_size sequences and (when given) batch_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) == batch_size or
                      (batch_tokens is not None and longest * (len(batch) + 1) > batch_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _score_batch(scorer, seqs: list[list[int]], scale: float, device, chunk_size, memory_budget,
                 backend) -> list[np.ndarray]:
    """Label-aligned log-probs of each sequence: right-padded batch, attention mask, the
    scorer's decoder, then its head through linear_token_stats (no [B, T, V] logits)."""
    from ..linear import linear_token_stats
    from .patch import _head, _head_operands

    lens = [len(s) for s in seqs]
    width = max(lens)
    if width == 1:  # sequences of one token predict nothing: the scorer has no position to score
        return [np.zeros(1, np.float32) for _ in seqs]
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    targets = torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    with torch.no_grad():
        hidden = scorer.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)[0]
        h, w, b = _head_operands(hidden[:, :-1], _head(scorer, "scorer"), scale)
        lp = linear_token_stats(h, w, targets, bias=b, chunk_size=chunk_size,
                                memory_budget=memory_budget, backend=backend).logprob
    lp = lp.float().cpu().numpy()
    return [np.concatenate([np.zeros(1, np.float32), lp[r, :n - 1]]) for r, n in enumerate(lens)]


def score_dataset(scorer, data, out, *, column: str = "input_ids", split: Optional[str] = None,
                  batch_size: int = 8, batch_tokens: Optional[int] = None,
                  shard_size: int = 4096, scorer_name: Optional[str] = None,
                  chunk_size: Optional[int] = None, memory_budget: Optional[int] = None,
                  backend: str = "auto", progress: bool = True, overwrite: bool = False,
                  verify: bool = True) -> dict:
    """Score every sequence of ``data`` (see ``read_token_sequences``) with the frozen
    ``scorer`` (a loaded causal LM) into the cache directory ``out``; returns the manifest.

    Re-running into the same ``out`` resumes: shards on disk whose sequence hashes match the
    data are kept as they are (not recomputed), the rest are scored. A manifest from another
    scorer, column or shard size is refused unless ``overwrite=True``. ``verify``: the probe of
    ``apply_remit`` (decoder + head must reproduce the scorer's own logits).
    """
    from .patch import _check_scorer_alone, logit_scale

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size, shard_size: expected >= 1, got {batch_size}, {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_scorer_alone(scorer)
    scorer.eval()
    scorer.requires_grad_(False)
    scale = logit_scale(scorer, "scorer")
    from .patch import _head, _probe
    if verify:
        _probe(scorer, scorer.forward, scale, "scorer")
    head_w = _head(scorer, "scorer").weight
    device = head_w.device
    header = {
        "format": FORMAT, "version": VERSION, "alignment": ALIGNMENT,
        "scorer": scorer_name or getattr(scorer, "name_or_path", None) or type(scorer).__name__,
        "scorer_fingerprint": scorer_fingerprint(scorer),
        "vocab_size": int(head_w.shape[0]), "dtype": str(head_w.dtype).replace("torch.", ""),
        "data": str(data), "column": column, "shard_size": int(shard_size),
    }
    mpath = out / MANIFEST
    if mpath.exists() and not overwrite:
        old = json.loads(mpath.read_text())
        keys = ("format", "version", "scorer_fingerprint", "vocab_size", "dtype", "column",
                "shard_size")
        diff = [k for k in keys if old.get(k) != header[k]]
        if diff:
            what = ", ".join(f"{k}: {old.get(k)!r} vs {header[k]!r}" for k in diff)
            raise ValueError(f"{out} holds a scorer cache made with other settings ({what}); "
                             "pass overwrite=True (--overwrite) or another output directory")
    elif overwrite:
        for f in out.glob("shard-*.safetensors*"):
            f.unlink()
    manifest = {**header, "complete": False, "num_sequences": None, "num_tokens": None,
                "shards": []}
    _write_json(mpath, manifest)

    seqs, total = read_token_sequences(data, column, split)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="seq", desc=f"score-hf {out.name}", dynamic_ncols=True)
    n_seq = n_tok = 0
    k = 0
    t0 = time.time()
    while True:
        shard = []
        for ids in seqs:
            shard.append([int(t) for t in ids])
            if len(shard) == shard_size:
                break
        if not shard:
            break
        if any(len(s) == 0 for s in shard):
            raise ValueError(f"{data}: an empty sequence in shard {k} (nothing to score)")
        hashes = [sequence_hash(s) for s in shard]
        path = out / _shard_name(k)
        scored_now = False
        if path.exists():
            on_disk = _read_shard_hashes(path)
            if on_disk != hashes:
                if on_disk is not None and not overwrite:
                    raise ValueError(f"{path}: holds other sequences than shard {k} of {data} "
                                     "(the data changed since it was scored); pass overwrite"
                                     "=True (--overwrite) or another output directory")
                path.unlink()
        if not path.exists():
            lps: list[Optional[np.ndarray]] = [None] * len(shard)
            for idx in _batches([len(s) for s in shard], batch_size, batch_tokens):
                res = _score_batch(scorer, [shard[i] for i in idx], scale, device, chunk_size,
                                   memory_budget, backend)
                for i, lp in zip(idx, res):
                    lps[i] = lp
                if bar is not None:
                    bar.update(len(idx))
            _write_shard(path, lps, hashes, {"first": n_seq, "count": len(shard)})
            scored_now = True
        elif bar is not None:
            bar.update(len(shard))
        tokens = sum(len(s) for s in shard)
        manifest["shards"].append({"file": path.name, "first": n_seq, "count": len(shard),
                                   "tokens": tokens,
                                   "digest": hashlib.blake2b(b"".join(hashes),
                                                             digest_size=16).hexdigest(),
                                   "resumed": not scored_now})
        n_seq += len(shard)
        n_tok += tokens
        k += 1
        _write_json(mpath, manifest)
    if bar is not None:
        bar.close()
    for stale in out.glob("shard-*.safetensors"):
        if int(stale.stem.split("-")[1]) >= k:
            stale.unlink()  # from a longer earlier run of changed data
    manifest.update(complete=True, num_sequences=n_seq, num_tokens=n_tok,
                    seconds=round(time.time() - t0, 3))
    _write_json(mpath, manifest)
    return manifest


# ------------------------------------------------------------------------------ joining


class ScorerCache:
    """Read side of a cache directory: ``cache[i]`` is sequence i's float32 log-probs (a
    tensor), ``cache.hash(i)`` its token hash, ``cache.find(h)`` the index of a hash. Shard
    files are opened lazily and memory-mapped; the object pickles (DataLoader workers reopen
    the files)."""

    def __init__(self, path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"{self.path}: no {MANIFEST} (not a scorer cache; make one "
                                    "with remit-ext score-hf)")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath}: not a remit_ext scorer cache")
        if not self.manifest.get("complete"):
            raise ValueError(f"{self.path}: the cache is incomplete (score-hf was interrupted); "
                             "re-run the same score-hf command to finish it")
        self.shards = self.manifest["shards"]
        self._firsts = np.array([s["first"] for s in self.shards], dtype=np.int64)
        self._files: dict[int, Any] = {}
        self._meta: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._by_hash: Optional[dict[bytes, int]] = None

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"scorer cache index {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._firsts, i, side="right")) - 1
        return k, i - int(self._firsts[k])

    def _shard(self, k: int):
        if k not in self._files:
            from safetensors import safe_open

            f = safe_open(str(self.path / self.shards[k]["file"]), framework="pt")
            self._files[k] = f
            self._meta[k] = (f.get_tensor("offsets").numpy(), f.get_tensor("hashes").numpy())
        return self._files[k], self._meta[k]

    def hash(self, i: int) -> bytes:
        k, j = self._locate(i)
        return bytes(self._shard(k)[1][1][j])

    def __getitem__(self, i: int) -> Tensor:
        k, j = self._locate(i)
        f, (offsets, _) = self._shard(k)
        return f.get_slice("logprobs")[int(offsets[j]):int(offsets[j + 1])]

    def find(self, h: bytes) -> int:
        if self._by_hash is None:
            self._by_hash = {}
            for k, s in enumerate(self.shards):
                for j, row in enumerate(self._shard(k)[1][1]):
                    self._by_hash.setdefault(bytes(row), s["first"] + j)
        try:
            return self._by_hash[h]
        except KeyError:
            raise ScorerCacheMismatchError(
                f"no sequence with token hash {h.hex()} in the scorer cache {self.path}: this "
                "example was not scored (re-run score-hf on this dataset)") from None


class ScorerCacheDataset(torch.utils.data.Dataset):
    """``dataset`` (any indexable of dict examples with ``column``) with each example's cached
    scorer log-probs added as ``out_column``.

    ``join="index"``: example i is cache entry i, and their token hashes must agree (a dataset
    shuffled, filtered or re-tokenized after scoring raises ``ScorerCacheMismatchError``);
    ``join="hash"``: the entry is looked up by the example's token hash (any order or subset of
    the scored data).
    """

    def __init__(self, dataset, cache, *, column: str = "input_ids",
                 out_column: str = "scorer_logprobs", join: str = "index"):
        if join not in ("index", "hash"):
            raise ValueError(f"join: expected 'index' or 'hash', got {join!r}")
        self.dataset = dataset
        self.cache = cache if isinstance(cache, ScorerCache) else ScorerCache(cache)
        self.column, self.out_column, self.join = column, out_column, join
        if join == "index" and len(dataset) != len(self.cache):
            raise ScorerCacheMismatchError(
                f"the dataset has {len(dataset)} examples, the scorer cache {self.cache.path} "
                f"{len(self.cache)}: join='index' pairs them one to one (join='hash' for a "
                "subset or reordering)")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        item[self.out_column] = self._logprobs(item[self.column], i)
        return item

    def _logprobs(self, ids, i: int) -> Tensor:
        """The cache entry of example i (token ids ``ids``), checked against its hash."""
        h = sequence_hash(ids)
        if self.join == "hash":
            j = self.cache.find(h)
        else:
            j = i
            if self.cache.hash(i) != h:
                raise ScorerCacheMismatchError(
                    f"example {i}: its token ids do not match scorer cache entry {i} of "
                    f"{self.cache.path} (hash {h.hex()} vs {self.cache.hash(i).hex()}): was the "
                    "dataset shuffled, filtered or re-tokenized after score-hf? Refusing to "
                    "train on another sequence's log-probs")
        lp = self.cache[j]
        if lp.numel() != len(ids):
            raise ScorerCacheMismatchError(f"example {i}: {len(ids)} tokens, cache entry {j} "
                                           f"{lp.numel()}")
        return lp


def add_scorer_logprobs(dataset, cache, *, column: str = "input_ids",
                        out_column: str = "scorer_logprobs", join: str = "index"):
    """A ``datasets.Dataset`` with the cached log-probs as a column (``dataset.map``; the same
    hash checks as ``ScorerCacheDataset``), for trainers that take only ``datasets`` datasets
    (TRL's ``SFTTrainer``: pass ``remove_unused_columns=False`` and
    ``dataset_kwargs={"skip_prepare_dataset": True}`` with ``ReMiTDataCollator``)."""
    joined = ScorerCacheDataset(dataset, cache, column=column, out_column=out_column,
                                join=join)

    def add(example, i):
        return {out_column: joined._logprobs(example[column], i).tolist()}

    return dataset.map(add, with_indices=True)


class ReMiTDataCollator:
    """Batches of token-id examples with an optional ``scorer_logprobs`` field.

    ``packed=False``: right-padded ``input_ids`` (``pad_token_id``), ``attention_mask``,
    ``labels`` (-100 at padding) and ``scorer_logprobs`` (0 at padding). ``packed=True``: one
    row of concatenated documents with ``position_ids`` restarting at 0 per document and no
    attention mask (Hugging Face's ``DataCollatorWithFlattening`` layout: the first label of
    each document is -100, so no document predicts the next one's first token); ReMiT then
    centres per document. ``labels`` default to ``input_ids``.
    """

    def __init__(self, pad_token_id: int = 0, *, packed: bool = False,
                 pad_to_multiple_of: Optional[int] = None, ignore_index: int = -100,
                 column: str = "scorer_logprobs"):
        self.pad_token_id, self.packed = pad_token_id, packed
        self.pad_to_multiple_of, self.ignore_index, self.column = (pad_to_multiple_of,
                                                                   ignore_index, column)

    @staticmethod
    def _list(x):
        return x.tolist() if hasattr(x, "tolist") else list(x)

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        ids = [self._list(f["input_ids"]) for f in features]
        labels = [self._list(f["labels"]) if "labels" in f else list(x)
                  for f, x in zip(features, ids)]
        has_lp = all(self.column in f for f in features)
        if any(self.column in f for f in features) and not has_lp:
            raise ValueError(f"{self.column}: present in some examples of the batch only")
        lps = [torch.as_tensor(f[self.column], dtype=torch.float32).reshape(-1)
               for f in features] if has_lp else None
        if self.packed:
            batch = {
                "input_ids": torch.tensor([sum(ids, [])]),
                "labels": torch.tensor([sum(([self.ignore_index] + y[1:] for y in labels), [])]),
                "position_ids": torch.tensor([sum((list(range(len(x))) for x in ids), [])]),
            }
            if has_lp:
                batch[self.column] = torch.cat(lps).unsqueeze(0)
            return batch
        width = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(ids)
        batch = {"input_ids": torch.full((n, width), self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros(n, width, dtype=torch.long),
                 "labels": torch.full((n, width), self.ignore_index, dtype=torch.long)}
        if has_lp:
            batch[self.column] = torch.zeros(n, width, dtype=torch.float32)
        for r, (x, y) in enumerate(zip(ids, labels)):
            batch["input_ids"][r, :len(x)] = torch.tensor(x)
            batch["attention_mask"][r, :len(x)] = 1
            batch["labels"][r, :len(y)] = torch.tensor(y)
            if has_lp:
                batch[self.column][r, :len(lps[r])] = lps[r]
        return batch
