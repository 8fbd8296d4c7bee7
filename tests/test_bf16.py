"""The GPU's half-precision path, run on the CPU: every editor of config.yaml in bfloat16.

Each real run edits a bf16 (or fp16) backbone on a GPU (configs/paper.yaml), while every
other test runs in float32: on the CPU `load_backbone` loads a half dtype in float32
unless `cpu_float32_fallback` is off. Here it is off. Untrained tiny backbones (both text
models) are saved and loaded back through `load_backbone`, so they are cast exactly as a
real run's are. Then every editor variant of config.yaml (`distinct_variants`), with its
training loops cut short, prepares (UniKE from a knowledge folder built in bf16 by the
pipeline's own functions), edits one case and, where it stacks edits, a sequence of three
through the harness, and restores. Checked:

- no module of the text model ever outputs a floating tensor in another dtype: a float32
  tensor from an editor (a neuron, a hook's feature shift) would promote the residual
  stream, or crash;
- every floating tensor the editor holds with its edits applied is in the model's dtype,
  except the parts it declares in `Editor.float32_parts` (with the reason), and those are
  float32;
- metrics are in [0, 1]; restore gives back the weights bit-exactly and, once the editor
  is closed, the same logits.

What only a GPU can show (CUDA kernels, device placement, memory): docs/real-backbones.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import REPO, make_backbone
from unike.backbones import Backbone, load_backbone, save_backbone
from unike.resources import resolve_dtype
from unike.config import edited_layers, load_config, method_entry, methods_for
from unike.data import case_samples, load_cases
from unike.editing import Editor, create_editor, parse_hparams, prepare_owners, resolve_editor
from unike.grid import SPLIT_FILES
from unike.harness import pre_edit_predictions, pre_edit_tensors, run_sequences
from unike.method.encoders import EncoderConfig, pretrain_encoders
from unike.method.knowledge import collect_triplets, extract_hidden_states, save_hidden_states, save_triplets
from unike.store import METRIC_COLUMNS

CONFIG = load_config(REPO / "config.yaml")
BACKBONE_OF = {"opt": "tiny-blip2-opt", "llama": "tiny-minigpt4"}  # config.yaml's backbone of each text model
DTYPE = torch.bfloat16
# Training loops cut short (a dtype mismatch shows in the first step) and the hypernetworks'
# edited layers cut to the test backbones' two; the rest as configured.
SHORT = {
    "baselines.ft:FineTune": {"steps": 2},
    "baselines.tpatcher:TPatcher": {"max_steps": 2},
    "baselines.ke:KnowledgeEditor": {"steps": 3, "log_every": 1, "n_layers": 2},
    "baselines.mend:MEND": {"steps": 3, "log_every": 1, "n_layers": 2},
    "baselines.serac:SERAC": {"cls_steps": 2, "cls_batch": 8, "cf_steps": 2, "cf_batch": 4},
    "unike.method.editor:UniKE": {"max_steps": 2},
}


def short(entry: dict) -> dict:
    return {"editor": entry["editor"], "hparams": {**entry["hparams"], **SHORT.get(entry["editor"], {})}}


def distinct_variants(methods: dict[str, dict]) -> list[str]:
    """The first method of each code path: methods whose hyperparameters differ only in
    numbers (Figure 4a's k, Figure 4b's alpha values) run the same code; a number against
    None (UniKE's fixed against adaptive alpha) or another string or flag does not."""
    seen, chosen = set(), []
    for name, entry in methods.items():
        cls = resolve_editor(entry["editor"])
        values = dataclasses.asdict(parse_hparams(cls.Hparams, entry["hparams"], name))
        key = (entry["editor"], tuple(sorted(
            (k, v if v is None or isinstance(v, (str, bool)) else "number") for k, v in values.items())))
        if key not in seen:
            seen.add(key)
            chosen.append(name)
    return chosen


VARIANTS = list(dict.fromkeys(name for backbone in BACKBONE_OF.values()
                              for name in distinct_variants(methods_for(CONFIG, backbone))))


def test_half_dtype_on_the_cpu_falls_back_to_float32_unless_told_not_to(tmp_path, world_config):
    assert resolve_dtype("bfloat16", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu", cpu_float32_fallback=False) == "bfloat16"
    assert resolve_dtype("float16", "cuda:0") == "float16"
    tiny = make_backbone(world_config, "opt")
    save_backbone(tmp_path, tiny.model, tiny.tokenizer, tiny.prompt_style, tiny.image_size, {})
    default = load_backbone("b", tmp_path, "cpu", "bfloat16")
    assert default.dtype == torch.float32 and default.requested_dtype == "bfloat16"
    half = load_backbone("b", tmp_path, "cpu", "float32", entry={"dtype": "bfloat16"}, cpu_float32_fallback=False)
    assert half.dtype == DTYPE and half.requested_dtype == "bfloat16"
    # All of it: transformers keeps the Q-Former in float32 in float16 only.
    assert {p.dtype for p in half.model.parameters()} == {DTYPE}
    fp16 = load_backbone("b", tmp_path, "cpu", "float16", cpu_float32_fallback=False)
    assert fp16.dtype == torch.float16 and fp16.model.qformer.layernorm.weight.dtype == torch.float32


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=sorted(BACKBONE_OF))
def saved(request, world_config, tmp_path_factory) -> tuple[str, Path]:
    """An untrained tiny backbone of one text model, saved as a backbone directory."""
    tiny = make_backbone(world_config, request.param)
    folder = tmp_path_factory.mktemp(f"bf16-{request.param}")
    save_backbone(folder, tiny.model, tiny.tokenizer, tiny.prompt_style, tiny.image_size, {})
    return request.param, folder


def load_bf16(saved) -> Backbone:
    kind, folder = saved
    return load_backbone(BACKBONE_OF[kind], folder, "cpu", "bfloat16", cpu_float32_fallback=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def train_cases(world_dir):
    return load_cases(world_dir / SPLIT_FILES[("e-vqa", "train")], "e-vqa", world_dir)


@pytest.fixture(scope="module")
def work(saved, train_cases, tmp_path_factory) -> dict:
    """The knowledge folder, built in bf16 by the pipeline's functions, and the prepared
    folders (filled on first use, one per `prepare_owners` owner)."""
    backbone = load_bf16(saved)
    knowledge = tmp_path_factory.mktemp("knowledge")
    triplets = collect_triplets(backbone, train_cases, limit=8, max_new_tokens=2)
    save_triplets(knowledge / "triplets.json", triplets)
    layers = edited_layers(CONFIG, len(backbone.text))
    save_hidden_states(knowledge / "hidden_states.safetensors", extract_hidden_states(backbone, triplets, layers),
                       layers)
    pretrain_encoders(knowledge, EncoderConfig(truth_dim=8, hidden=32, steps=3, batch_size=8))
    return {"knowledge": knowledge, "prepared": {}, "root": tmp_path_factory.mktemp("prepared")}


def prepared_folder(work: dict, backbone: Backbone, method: str, train_cases) -> Path:
    methods = {name: short(entry) for name, entry in methods_for(CONFIG, backbone.name).items()}
    owner = prepare_owners(methods)[method]
    if owner not in work["prepared"]:
        entry = methods[owner]
        cls = resolve_editor(entry["editor"])
        out = work["root"] / owner
        out.mkdir()
        extra = {"knowledge": work["knowledge"]} if cls.needs_knowledge else {}
        cls.prepare(backbone, parse_hparams(cls.Hparams, entry["hparams"], owner), train_cases, out, 0, **extra)
        work["prepared"][owner] = out
    return work["prepared"][owner]


# ---------------------------------------------------------------- what is checked
def floating_tensors(value):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from floating_tensors(v)
    elif isinstance(value, dict):  # ModelOutput is an OrderedDict
        for v in value.values():
            yield from floating_tensors(v)


class OutputDtypes:
    """Forward hooks on every module of the text model; `wrong` collects (module, dtype)
    of every floating output not in the model's dtype."""

    def __init__(self, backbone: Backbone):
        self.dtype, self.wrong, self.handles = backbone.dtype, set(), []
        for name, module in backbone.text.lm.named_modules():
            self.handles.append(module.register_forward_hook(
                lambda _m, _args, out, name=name: self.wrong.update(
                    (name or "<text model>", str(t.dtype)) for t in floating_tensors(out) if t.dtype != self.dtype)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def held_tensors(editor, backbone: Backbone) -> dict[str, torch.Tensor]:
    """Every floating tensor the editor holds, by attribute path, apart from the
    backbone's own parameters and buffers: its plain attributes, containers, nn.Modules
    (parameters and buffers) and the objects of this project it holds, recursively."""
    own = {id(t) for t in backbone.model.state_dict(keep_vars=True).values()}
    backbone_modules = {id(m) for m in backbone.model.modules()}
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(value, path: str) -> None:
        if id(value) in seen or id(value) in own or isinstance(value, Backbone) or id(value) in backbone_modules:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                found[path] = value
        elif isinstance(value, nn.Module):
            for name, t in [*value.named_parameters(), *value.named_buffers()]:
                walk(t, f"{path}.{name}")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif type(value).__module__.split(".")[0] in ("unike", "baselines") and hasattr(value, "__dict__"):
            for k, v in vars(value).items():
                walk(v, f"{path}.{k}")

    for name, value in vars(editor).items():
        walk(value, name)
    return found


def check_held_dtypes(editor, backbone: Backbone) -> list[str]:
    """Problems with the dtypes of what the editor holds (empty: none)."""
    declared = type(editor).float32_parts
    # A copy of a backbone module (SERAC's counterfactual LM) keeps what transformers keeps
    # in float32 in the backbone too (LLaMA's rotary frequencies): matched by name.
    kept = {tuple(name.split(".")[-2:]) for name, t in [*backbone.model.named_parameters(),
                                                         *backbone.model.named_buffers()] if t.dtype == torch.float32}
    problems = []
    for path, t in held_tensors(editor, backbone).items():
        part = path.split(".")[0].split("[")[0]
        if part in declared:
            if t.dtype != torch.float32:
                problems.append(f"{path}: {t.dtype}, but float32_parts says float32 ({declared[part]})")
        elif t.dtype != backbone.dtype and not (t.dtype == torch.float32 and tuple(path.split(".")[-2:]) in kept):
            problems.append(f"{path}: {t.dtype}, not the model's {backbone.dtype}")
    return problems


# ---------------------------------------------------------------- the test
@pytest.mark.parametrize("method", VARIANTS)
def test_method_prepares_edits_and_restores_in_bfloat16(method, saved, work, train_cases, vqa_cases):
    backbone = load_bf16(saved)
    assert backbone.dtype == DTYPE
    outputs = OutputDtypes(backbone)
    try:
        entry = short(method_entry(CONFIG, method, backbone.name))
        cls = resolve_editor(entry["editor"])
        prepared = prepared_folder(work, backbone, method, train_cases) if cls.needs_training else None
        cases = vqa_cases[:4]
        pre_edit = pre_edit_tensors(pre_edit_predictions(backbone, cases), cases)
        weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
        probe = backbone.encode(case_samples(vqa_cases[4]))  # a case no edit touches
        before = backbone.logits(probe)

        editor = create_editor(entry, backbone, prepared, work["knowledge"] if cls.needs_knowledge else None)
        problems = []  # per sequence, found with its edits still applied
        restore = editor.restore

        def checked_restore():
            problems.append(check_held_dtypes(editor, backbone))
            restore()

        editor.restore = checked_restore
        sequences = [[cases[0]]] + ([cases[1:4]] if cls.supports_sequential(editor.hparams) else [])
        rows = run_sequences(editor, sequences, pre_edit)
        editor.close()
        assert len(problems) == len(sequences) and not any(problems), problems
        assert not outputs.wrong, sorted(outputs.wrong)
        assert len(rows) == sum(map(len, sequences))
        assert all(0.0 <= r[m] <= 1.0 for r in rows for m in METRIC_COLUMNS), rows
        state = backbone.model.state_dict()
        assert all(torch.equal(weights[k], v) and weights[k].dtype == v.dtype for k, v in state.items())
        assert torch.equal(backbone.logits(probe), before)
    finally:
        outputs.remove()


def test_the_checks_catch_a_float32_feature_shift(saved, vqa_cases):
    """What the checks above see of an editor that made its tensor in float32: a shift of
    the last layer's FFN output (a float32 neuron would crash at its first matmul)."""

    class Float32Shift(Editor):
        def edit(self, case):
            text = self.backbone.text
            self.shift = torch.zeros(text.lm.config.hidden_size)  # the mistake: float32
            ffn_out = text.ffn_linears(len(text) - 1)["out." + ("fc2" if text.kind == "opt" else "down_proj")]
            self.handle = ffn_out.register_forward_hook(lambda _m, _args, out: out + self.shift)

        def restore(self):
            self.handle.remove()

    backbone = load_bf16(saved)
    outputs = OutputDtypes(backbone)
    editor = Float32Shift(backbone)
    editor.edit(vqa_cases[0])
    try:
        assert check_held_dtypes(editor, backbone) == ["shift: torch.float32, not the model's torch.bfloat16"]
        with contextlib.suppress(RuntimeError):  # the final norm or the head may refuse float32 input
            backbone.logits(backbone.encode(case_samples(vqa_cases[0])))
        last = "model.decoder.layers.1" if saved[0] == "opt" else "model.layers.1"
        assert (last, "torch.float32") in outputs.wrong
    finally:
        editor.restore()
        outputs.remove()
