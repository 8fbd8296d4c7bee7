"""What a workflow job asks its executor for: host memory, GPU memory and time, computed
from the config. Torch-free: the rules' resource functions run while Snakemake builds the
DAG. Cluster specifics (account, partitions, GPU names, the large-GPU threshold) live only
in the profiles; docs/real-backbones.md ("Cluster requests") lists the figures below and
their sources.

- Tiny backbones: every rule asks for what it asked before real backbones existed
  (`TINY_REQUESTS`).
- A rule that loads a real backbone (`BACKBONE_RULES`): host memory = the rule's tiny
  request (the job without its weights) + the weights in the dtype they load in, times
  `HOST_LOAD_FACTOR`; GPU memory from the weights, from the method's measured peak
  (benchmarks/results/gpu_resources.json) or its published figure; time from the items the
  job works through times a cost per item (measured, else `DEFAULT_S_PER_CASE`).
- A retry (Snakemake passes `attempt`, from 1) doubles memory and time: a job killed for
  memory or at its time limit comes back with twice as much, then four times.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

from unike.grid import E_IC, E_VQA, SPLIT_FILES, Layout, case_tasks, regime

MIB = 2**20
GB = 10**9
GIB = 2**30
MEASURED = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu_resources.json"


@dataclasses.dataclass(frozen=True)
class Request:
    mem_mb: int  # host memory, first attempt
    runtime: int  # minutes, first attempt


# What each rule asked for with the tiny world (issue 17's "today's values"; the smoke DAG
# ran through a real Slurm with them, tests/test_slurm.py). For a real backbone they are
# the job without its weights: process, data, the rule's own buffers.
TINY_REQUESTS = {
    "make_world": Request(1000, 10),
    "pretrain_backbone": Request(4000, 60),
    "mine_edits": Request(3000, 30),
    "cache_pre_edit": Request(3000, 30),
    "prepare_editor": Request(6000, 240),
    "edit_eval": Request(4000, 120),
    "collect_triplets": Request(4000, 120),
    "extract_hidden_states": Request(8000, 60),
    "pretrain_encoders": Request(4000, 60),
    "embed_spaces": Request(4000, 30),
}
BACKBONE_RULES = ("mine_edits", "cache_pre_edit", "prepare_editor", "edit_eval", "collect_triplets",
                  "extract_hidden_states")

# Parameters of the paper's backbones, counted with transformers on the meta device from
# the published configs in tests/fixtures (benchmarks/gpu_resources.py's architectures):
# used when the backbone's weights are not on this machine (a dry run) and its entry
# gives no `resources.parameters`.
PUBLISHED_PARAMETERS = {"blip2-opt": 3_744_761_856, "minigpt4": 7_832_696_320}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# Loading: `load_backbone` materialises the weights on the host in the run's dtype, then
# moves them to the device; while it reads, the checkpoint's file pages (the converted
# MiniGPT-4 stores Vicuna in fp16 and the vision side in fp32) are charged to the job's
# cgroup too. One copy plus half again: a chosen margin, not measured.
HOST_LOAD_FACTOR = 1.5
# GPU: the weights plus a quarter for activations (five scored inputs at 364 px), the CUDA
# context and the allocator's cache; a chosen margin, replaced by a method's measured peak.
GPU_HEADROOM = 1.25
TINY_GPU_GB = 1  # a tiny backbone has a few MB of weights: the smallest whole request
# Published peak GPU memory where a method needs more than its backbone's estimate:
# EasyEdit's SERAC on MiniGPT-4 (a second, trainable copy of the language model), 56.8 GB,
# as cited in issue 17. (editor, backbone paper_name) -> GB.
PUBLISHED_GPU_GB = {("baselines.serac:SERAC", "minigpt4"): 56.8}

# Time. Seconds per edit case including its evaluation when nothing is measured: the
# published 1-2 s per edit plus evaluation (upper end), IKE's 2.5 s per item (issue 17).
# Every other per-item pass (pre-edit predictions, triplets, hidden states) does less
# than an edit with its evaluation, so the same figure bounds it.
DEFAULT_S_PER_CASE = 2.0
DEFAULT_S_PER_CASE_BY_EDITOR = {"baselines.ike:IKE": 2.5}
# Measured or published figures are medians on one card; a cluster's cards may be slower.
TIME_SAFETY = 2.0
STARTUP_MIN = 10  # load the weights from a shared file system, build the editor: an allowance
# A trained method's preparation (MEND's 20,000 steps, SERAC's classifier and counterfactual
# model) until gpu_resources.json times its steps: one day, a common partition limit.
PREPARE_DEFAULT_MIN = 24 * 60
# MMEdit's published split sizes (Cheng et al. 2023, Table 1), for an annotation file
# that is not on this machine.
MMEDIT_SPLIT_SIZES = {(E_VQA, "train"): 6346, (E_VQA, "eval"): 2093, (E_IC, "train"): 2849, (E_IC, "eval"): 1000}
# benchmarks/gpu_resources.py measures configs/paper.yaml's backbones under these names.
MEASURED_BACKBONES = {"blip2-opt": "blip2-opt-2.7b", "minigpt4": "minigpt4-7b"}
SAME_ARCHITECTURE = 0.02  # a measurement applies to a backbone within 2% of its parameter count


def retry_growth(first: int, attempt: int) -> int:
    """A request at `attempt` (from 1): twice as much after a kill for memory or time, then four times."""
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, got {attempt}")
    return first * 2 ** (attempt - 1)


def resolve_dtype(dtype: str, device: str, cpu_float32_fallback: bool = True) -> str:
    """The dtype a backbone loads in: bf16/fp16 on a GPU; on the CPU fp32 (half precision
    there is slow), unless `cpu_float32_fallback` is off: then the half dtype as asked, which
    is how the GPU's half-precision path runs on a CPU (tests/test_bf16.py). Torch-free, so
    job sizes (here) and the loader (unike.backbones) follow one rule."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    if dtype != "float32" and not str(device).startswith("cuda") and cpu_float32_fallback:
        return "float32"
    return dtype


def load_dtype(config: Mapping, entry: Mapping) -> str:
    """The dtype a backbone's weights live in: the entry's, else the config's, as resolved."""
    return resolve_dtype(entry.get("dtype", config.get("dtype", "float32")), config.get("device", "cpu"),
                         config.get("cpu_float32_fallback", True))


@functools.cache
def safetensors_parameters(folder: Path) -> int | None:
    """Elements of every tensor in the folder's *.safetensors files, read from their JSON
    headers (no weights are read); None when the folder has none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, tensor in header.items():
            if name != "__metadata__":
                total += math.prod(tensor["shape"])
    return total


def parameter_count(entry: Mapping, folder: Path | None) -> tuple[int, str]:
    """(parameters, where the count comes from): the entry's `resources.parameters`, the
    weights in `folder`, else the published size of its paper backbone."""
    given = entry.get("resources", {}).get("parameters")
    if given is not None:
        return int(given), "config"
    counted = safetensors_parameters(folder) if folder is not None and folder.is_dir() else None
    if counted:
        return counted, "weights"
    return PUBLISHED_PARAMETERS[entry["paper_name"]], "published"


@functools.cache
def _record_count(path: Path) -> int:
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of MMEdit records")
    return len(records)


def load_measurements(path: Path = MEASURED) -> dict:
    """gpu_resources.json's backbones when it holds full-size measurements on a GPU, else {}:
    a tiny-scale or CPU run measures nothing a cluster job can use."""
    if not path.is_file():
        return {}
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("scale") != "full" or result.get("device_type") != "cuda":
        return {}
    return result.get("backbones", {})


class JobSizer:
    """Every rule's requests for one config. `measured` is `load_measurements()`'s mapping."""

    def __init__(self, config: Mapping, measured: Mapping | None = None):
        self.config = config
        self.layout = Layout(dict(config))
        self.measured = measured or {}

    # ------------------------------------------------------------ backbone
    def is_real(self, backbone: str | None) -> bool:
        return backbone is not None and self.config["backbones"][backbone]["source"] == "local"

    def _entry(self, backbone: str) -> Mapping:
        return self.config["backbones"][backbone]

    def _override(self, backbone: str, key: str):
        return self._entry(backbone).get("resources", {}).get(key)

    def parameters(self, backbone: str) -> tuple[int, str]:
        return parameter_count(self._entry(backbone), self.layout.backbone_dir(backbone))

    def weights_bytes(self, backbone: str) -> int:
        return self.parameters(backbone)[0] * DTYPE_BYTES[load_dtype(self.config, self._entry(backbone))]

    def _measured(self, backbone: str) -> Mapping:
        """The measured record of this backbone's architecture, or {}."""
        record = self.measured.get(MEASURED_BACKBONES[self._entry(backbone)["paper_name"]], {})
        total = record.get("parameters", {}).get("total")
        if not total or abs(total - self.parameters(backbone)[0]) > SAME_ARCHITECTURE * total:
            return {}
        return record

    def _measured_method(self, backbone: str, method: str) -> Mapping:
        """The measurement of `method`, else of a measured method with the same editor."""
        methods = self._measured(backbone).get("methods", {})
        editor = self.config["methods"][method]["editor"]
        candidates = [methods.get(method, {})] + [m for m in methods.values() if m.get("editor") == editor]
        return next((m for m in candidates if m.get("status") == "ok" and m.get("editor") == editor), {})

    # ------------------------------------------------------------ host memory
    def mem_mb(self, rule: str, backbone: str | None = None) -> int:
        """Host memory of the first attempt."""
        base = TINY_REQUESTS[rule].mem_mb
        if rule not in BACKBONE_RULES or not self.is_real(backbone):
            return base
        given = self._override(backbone, "mem_mb")
        if given is not None:
            return int(given)
        return base + math.ceil(self.weights_bytes(backbone) * HOST_LOAD_FACTOR / MIB)

    # ------------------------------------------------------------ GPU memory
    def gpu_mem_gb(self, rule: str, backbone: str, method: str | None = None, needs_knowledge: bool = False) -> int:
        """GPU memory (GB, rounded up) of a job of `rule` that runs `backbone` on the GPU."""
        given = self._override(backbone, "gpu_mem_gb")
        if given is not None:
            return math.ceil(given)
        if not self.is_real(backbone):
            return TINY_GPU_GB
        need = self.weights_bytes(backbone) * GPU_HEADROOM / GB
        if method is not None and rule in ("prepare_editor", "edit_eval"):
            need = max(need, self._method_gpu_gb(backbone, method, needs_knowledge))
        return max(1, math.ceil(need))

    def _method_gpu_gb(self, backbone: str, method: str, needs_knowledge: bool) -> float:
        m = self._measured_method(backbone, method)
        if m:
            # What the allocator held (reserved), editing or preparing, whichever is larger.
            peaks = [m.get("peak_reserved_gib"), m.get("prepare", {}).get("peak_reserved_gib")]
            gb = max(p for p in peaks if p is not None) * GIB / GB
            knowledge = self._measured(backbone).get("knowledge")
            if needs_knowledge and knowledge:
                # Measured on a few triplets; a real folder holds knowledge.n_triplets of them.
                n = self.config.get("knowledge", {}).get("n_triplets", knowledge["config_n_triplets"])
                gb += knowledge["state_bytes_per_triplet"] * max(0, n - knowledge["triplets"]) / GB
            return gb
        editor = self.config["methods"][method]["editor"]
        return PUBLISHED_GPU_GB.get((editor, self._entry(backbone)["paper_name"]), 0.0)

    # ------------------------------------------------------------ cases
    def split_cases(self, backbone: str, task: str, split: str) -> int:
        """Records of a task's split: data.n_eval when it limits the eval split, else the
        annotation file's record count, else MMEdit's published size (tiny world: the
        world's own counts)."""
        data = self.config["data"]
        limit = data.get("n_eval", {}).get(task) if split == "eval" else None
        if limit is not None:
            return int(limit)
        if data["source"] == "tiny-world":
            return int(self.config.get("world", {})[f"n_{'vqa' if task == E_VQA else 'caption'}_{split}"])
        path = self.layout.annotations(backbone) / SPLIT_FILES[(task, split)]
        return _record_count(path) if path.is_file() else MMEDIT_SPLIT_SIZES[(task, split)]

    def edited_cases(self, backbone: str, task: str, regime_name: str) -> int:
        """Cases an edit_eval job edits and scores: full sequences only; a task-mixing
        sequence takes length/2 cases of each task (unike.harness.make_sequences)."""
        spec = regime(regime_name)
        counts = [self.split_cases(backbone, t, "eval") for t in case_tasks(task)]
        if spec.mixes_tasks:
            half = spec.length // 2
            return min(n // half for n in counts) * spec.length
        return counts[0] // spec.length * spec.length

    # ------------------------------------------------------------ time
    def runtime(self, rule: str, backbone: str | None = None, task: str | None = None, method: str | None = None,
                regime_name: str | None = None) -> int:
        """Minutes of the first attempt."""
        if rule not in BACKBONE_RULES or not self.is_real(backbone):
            return TINY_REQUESTS[rule].runtime
        if rule == "prepare_editor":
            work_s = self._prepare_s(backbone, task, method)
            if work_s is None:
                return PREPARE_DEFAULT_MIN
        else:
            items, per_item = self._work(rule, backbone, task, method, regime_name)
            work_s = items * per_item
        return STARTUP_MIN + math.ceil(work_s * TIME_SAFETY / 60)

    def _work(self, rule: str, backbone: str, task: str | None, method: str | None,
              regime_name: str | None) -> tuple[int, float]:
        """(items, seconds per item) of a rule that goes through cases or triplets."""
        if rule == "edit_eval":
            m = self._measured_method(backbone, method)
            editor = self.config["methods"][method]["editor"]
            per_case = m.get("s_per_case") or DEFAULT_S_PER_CASE_BY_EDITOR.get(editor, DEFAULT_S_PER_CASE)
            return self.edited_cases(backbone, task, regime_name), per_case
        if rule == "cache_pre_edit":
            return self.split_cases(backbone, task, "eval"), DEFAULT_S_PER_CASE
        if rule == "mine_edits":
            every = [self.split_cases(backbone, t, s) for t in case_tasks("cross-task") for s in ("train", "eval")]
            return sum(every), DEFAULT_S_PER_CASE
        if rule == "collect_triplets":  # the backbone's answers on the train cases of both tasks
            return sum(self.split_cases(backbone, t, "train") for t in case_tasks("cross-task")), DEFAULT_S_PER_CASE
        if rule == "extract_hidden_states":
            # Measured: the three knowledge stages timed together per triplet, a bound for this one.
            knowledge = self._measured(backbone).get("knowledge")
            n = self.config.get("knowledge", {}).get("n_triplets", 0)
            return n, knowledge["s"] / knowledge["triplets"] if knowledge else DEFAULT_S_PER_CASE
        raise ValueError(f"no work model for rule {rule!r}")

    def _prepare_s(self, backbone: str, task: str, method: str) -> float | None:
        """A measured preparation scaled to the real run: by its cut training loops
        (configured / measured steps) or by the train cases, whichever is larger."""
        m = self._measured_method(backbone, method)
        prepare = m.get("prepare")
        if not prepare:
            return None
        train = sum(self.split_cases(backbone, t, "train") for t in case_tasks(task))
        ratios = [train / prepare["train_cases"]]
        ratios += [c["config"] / c["used"] for c in m.get("changed_hparams", {}).values()
                   if isinstance(c.get("config"), int) and isinstance(c.get("used"), int) and c["used"] > 0]
        return prepare["s"] * max(1.0, *ratios)
