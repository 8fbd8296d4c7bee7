"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual model
(Mitchell et al., ICML 2022), multimodal.

Three parts, all outside the backbone, which is never modified:

- **Edit memory**: the edits applied so far (sequential edits accumulate; `restore`
  clears it).
- **Scope classifier** (embedding-distance mode of the original): an encoder maps an
  input (image, prompt) to a vector e; the in-scope score of an input x for a memorised
  edit m is s = exp(-|e(x) - e(m)|^2); an input's score is its maximum over the memory.
  The encoder sees the edit input and the scored input as (image, prompt) only: the
  answer of a scored input never reaches it, and neither does an edit's label.
- **Counterfactual model**: a causal LM that reads `"{edit input} {edit label} {test
  input}"` (the edit with the largest score) and is trained with labels on the test
  answer only; the scored input's image goes in through the backbone's own vision path
  (cached Q-Former features, projected into the counterfactual LM when its width differs).

`predict` runs the backbone on the scored inputs as they are, then, with hard routing
(the default), replaces the predictions of every input whose score exceeds `threshold`
(0.5) by the counterfactual model's; with `routing: soft` it mixes the distributions,
log((1 - s) p_base + s p_cf), as EasyEdit's multimodal SERAC does.

Both parts are trained in `prepare` on the train split (Adam), less a validation slice
(`validation_share`, whole facts: `unike.hypernet.split_validation`, as KE and MEND):
- classifier: balanced binary cross-entropy on s. Positives: an edit's rephrased
  question, its rephrased image, and both, vs the edit input; negatives: the edit's locality
  inputs (text and multimodal) and the inputs of other edits with another label (an edit
  with the same label is the same update).
- counterfactual model: NLL of the edit's answer on its inputs (edit, rephrase, image
  rephrase) given the edit. It must read the label from the edit, and be able to say any
  word an edit states: the original SERAC's counterfactual model is a pretrained LM
  fine-tuned on many distinct labels and copies any string; the tiny world's train split
  has a handful of labels per task and no eval creature's name. So the labels are
  augmented (ours; the original trains on its dataset's labels): with probability
  `cf_label_shuffle` an example's edit label, and so its target, is replaced by another
  answer string of the task's train records (edit labels, the backbone's answers, locality
  answers); with probability `cf_label_vocab` by such a string with each of its words (at
  least one) swapped, with probability 1/2, for a random word of the backbone's vocabulary
  (an answer's shape, any word in it; never an eval fact). Without the vocabulary labels the
  tiny-world model could not produce a word no train label holds (E-IC: eval captions name
  creatures of their own, and routing turned mostly right captions into train captions);
  without augmentation it answered eval edits with train labels. `cf_image_noise` (ours)
  adds Gaussian noise to the image features it reads in training (that times each feature
  vector's std): the train split pictures a few creatures, the eval split others, whose
  features the model never trained on; without it the tiny-blip2-opt counterfactual model,
  right on every held-out train edit, scored eval E-VQA Rel 72.5 (100 with it).
  `prepare` records the training curve (mean loss per 50 steps) and, on the validation
  slice, the saved editor's figures: the benchmark's scores of each case edited alone
  (`validation`) and of the same cases with vocabulary words swapped into their labels
  (`validation_vocab`: answer words no train label need hold), with the counterfactual
  model's answer NLL on the in-scope inputs (`cf_nll`).

Configurations (hparams) for the backbones:
- tiny world (default): classifier "tiny" = token embeddings over the backbone's own
  tokenizer + `cls_layers` transformer layers, mean-pooled, plus an image branch (the
  input's mean Q-Former feature through a linear map; a learned vector when there is no
  image); counterfactual "backbone" = a copy of the backbone's text model, trained whole or
  in its last `cf_layers` layers. On CPU, one thread, `prepare` took 2-5 minutes (wall,
  a busy two-core machine; docs/baselines.md, SERAC).
- EasyEdit's choices for the real backbones are config values: `classifier:
  /path/to/distilbert-base-cased` (a local Hugging Face encoder; its first-token embedding)
  and, for BLIP-2 OPT, `counterfactual: /path/to/opt-125m` (a local causal LM, loaded in the
  backbone's dtype like the copy; the image features go through a new, trained, linear
  projection) or, for MiniGPT-4,
  `counterfactual: backbone` with `cf_layers: 1`. A configured path that is missing is an
  error naming it; nothing is downloaded.

Differences from EasyEdit's multimodal SERAC, on purpose:
- No label leak: EasyEdit's classifier embeds the cached edit and the test input *with
  their answers* (prompt + target), so at test time the scope decision sees the answer
  being scored. Here the classifier only ever receives (image, prompt).
- The classifier is trained (balanced BCE), not only the soft mixture; routing is hard by
  default, as in the original SERAC.
- The image projection of an external counterfactual LM is trained (EasyEdit creates it
  but leaves it out of the optimised parameters).
- The classifier has an image branch: in E-IC every edit input has the same kind of text
  ("a photo of"), and sequential E-VQA memories hold the same question about different
  creatures, so text alone cannot tell which edit an input belongs to
  (`cls_use_image: false` gives the text-only classifier of the original).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from unike.backbones import Backbone, TextStack, answer_predictions
from unike.data import ROWS, case_samples, edit_prompt, EditCase, Sample, vqa_prompt
from unike.editing import Editor
from unike.hypernet import split_validation
from unike.metrics import score_case

log = logging.getLogger(__name__)

WEIGHTS = "serac.safetensors"
META = "serac.json"
# Hyperparameters that decide the shapes of what `prepare` saved.
ARCH_FIELDS = ("classifier", "cls_dim", "cls_layers", "cls_use_image", "counterfactual", "cf_layers")


@dataclass(frozen=True)
class SERACHparams:
    # scope classifier
    classifier: str = "tiny"  # "tiny", or a local Hugging Face encoder directory (distilbert-base-cased)
    cls_dim: int = 64
    cls_layers: int = 1  # "tiny": transformer layers over the token embeddings (0: mean of the embeddings)
    cls_use_image: bool = True
    cls_steps: int = 300
    cls_lr: float = 1e-3
    cls_batch: int = 64
    threshold: float = 0.5
    # counterfactual model
    counterfactual: str = "backbone"  # "backbone" (a copy of its text model), or a local causal-LM directory
    cf_layers: int = 0  # 0: train every parameter of the counterfactual LM; n: only its last n layers
    cf_steps: int = 1000
    cf_lr: float = 1e-3
    cf_batch: int = 16
    cf_label_shuffle: float = 0.4  # share of examples whose label is another train answer string
    cf_label_vocab: float = 0.5  # share whose label is a train answer string with words swapped for vocabulary words
    cf_image_noise: float = 0.5  # training: Gaussian noise on the image features, times their per-vector std
    validation_share: float = 0.1  # train cases held out of training for the validation figures (split_validation)
    routing: str = "hard"  # hard | soft

    def __post_init__(self):
        if self.routing not in ("hard", "soft"):
            raise ValueError(f"SERAC: routing must be 'hard' or 'soft', got {self.routing!r}")
        if self.cf_image_noise < 0:
            raise ValueError(f"SERAC: cf_image_noise must be >= 0, got {self.cf_image_noise}")
        if self.cf_label_shuffle < 0 or self.cf_label_vocab < 0 or self.cf_label_shuffle + self.cf_label_vocab > 1:
            raise ValueError("SERAC: cf_label_shuffle and cf_label_vocab must be >= 0 and sum to at most 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"SERAC: threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class ScopeInput:
    """What the scope classifier may see of an input: its image and its prompt, no answer."""

    image: Path | None
    prompt: str


def scope_input(sample: Sample) -> ScopeInput:
    return ScopeInput(sample.image, sample.prompt)


def edit_scope_input(case: EditCase) -> ScopeInput:
    return ScopeInput(case.image, edit_prompt(case.task, case.src))


def cf_sample(edit: EditCase, sample: Sample) -> Sample:
    """The counterfactual model's input: "{edit input} {edit label} {test input}"."""
    return Sample(sample.image, f"{edit_prompt(edit.task, edit.src)} {edit.alt} {sample.prompt}", sample.answer)


def _local_dir(spec: str, what: str) -> Path:
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"SERAC {what} {spec!r}: {path}/config.json not found. It must be a local "
                                "Hugging Face model directory (nothing is downloaded); use 'tiny' / 'backbone' "
                                "for the built-in choices")
    return path


# ---------------------------------------------------------------- scope classifier
class ScopeClassifier(nn.Module):
    """Embedding-distance scope classifier over (image, prompt)."""

    def __init__(self, backbone: Backbone, h: SERACHparams):
        super().__init__()
        self.backbone_ref = [backbone]  # not a submodule: its weights are not ours
        self.kind = "tiny" if h.classifier == "tiny" else "hf"
        if self.kind == "tiny":
            self.tokenizer = backbone.tokenizer
            self.max_len = 64
            self.embed_tokens = nn.Embedding(len(self.tokenizer), h.cls_dim, padding_idx=self.tokenizer.pad_token_id)
            self.embed_pos = nn.Embedding(self.max_len, h.cls_dim)
            nn.init.normal_(self.embed_tokens.weight, std=0.1)
            nn.init.normal_(self.embed_pos.weight, std=0.02)
            layer = nn.TransformerEncoderLayer(h.cls_dim, nhead=4 if h.cls_dim % 4 == 0 else 1,
                                               dim_feedforward=2 * h.cls_dim, dropout=0.0, batch_first=True)
            self.encoder = (nn.TransformerEncoder(layer, h.cls_layers, enable_nested_tensor=False)
                            if h.cls_layers else None)
            width = h.cls_dim
        else:
            from transformers import AutoModel, AutoTokenizer

            path = _local_dir(h.classifier, "classifier")
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.max_len = min(int(getattr(self.tokenizer, "model_max_length", 512) or 512), 512)
            self.encoder = AutoModel.from_pretrained(path, local_files_only=True)
            width = self.encoder.config.hidden_size
        self.text_out = nn.Linear(width, h.cls_dim)
        self.use_image = h.cls_use_image
        if self.use_image:
            image_dim = backbone.model.config.text_config.hidden_size
            self.image_out = nn.Linear(image_dim, h.cls_dim)
            self.no_image = nn.Parameter(torch.zeros(h.cls_dim))

    def _text(self, prompts: list[str]) -> torch.Tensor:
        device = self.text_out.weight.device
        if self.kind == "tiny":
            rows = [ids[: self.max_len] or [self.tokenizer.unk_token_id]
                    for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = True
            ids, mask = ids.to(device), mask.to(device)
            x = self.embed_tokens(ids) + self.embed_pos(torch.arange(width, device=device))
            if self.encoder is not None:
                x = self.encoder(x, src_key_padding_mask=~mask)
            m = mask.unsqueeze(-1).to(x.dtype)
            return self.text_out((x * m).sum(1) / m.sum(1))
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt").to(device)
        return self.text_out(self.encoder(**enc).last_hidden_state[:, 0])  # first-token (CLS) embedding

    def _image(self, images: list[Path | None]) -> torch.Tensor:
        out = self.no_image.expand(len(images), -1).clone()
        rows = [i for i, p in enumerate(images) if p is not None]
        if rows:
            feats = self.backbone_ref[0].image_features([images[i] for i in rows]).mean(1)
            out[rows] = self.image_out(feats.to(self.image_out.weight.device, self.image_out.weight.dtype))
        return out

    def embed(self, inputs: list[ScopeInput]) -> torch.Tensor:
        for x in inputs:
            if not isinstance(x, ScopeInput):
                raise TypeError(f"the scope classifier takes ScopeInput (image, prompt), got {type(x).__name__}")
        text = self._text([x.prompt for x in inputs])
        if not self.use_image:
            return text
        return torch.cat([text, self._image([x.image for x in inputs])], dim=-1)

    @staticmethod
    def log_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """log s = -|a_i - b_j|^2, (len(a), len(b))."""
        return -((a.unsqueeze(1) - b.unsqueeze(0)) ** 2).sum(-1)


# ---------------------------------------------------------------- counterfactual model
class CounterfactualModel(nn.Module):
    """A causal LM over the backbone's token ids, fed the backbone's image features."""

    def __init__(self, backbone: Backbone, h: SERACHparams):
        super().__init__()
        self.backbone_ref = [backbone]
        image_dim = backbone.model.config.text_config.hidden_size
        if h.counterfactual == "backbone":
            self.lm = copy.deepcopy(backbone.model.language_model)
            self.projection = None
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = _local_dir(h.counterfactual, "counterfactual model")
            self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=backbone.dtype,
                                                           local_files_only=True).to(backbone.device)
            probe = "Question: what is in the image? Short answer: a photo of a dog"
            theirs = AutoTokenizer.from_pretrained(path, local_files_only=True)(probe, add_special_tokens=False)
            ours = backbone.tokenizer(probe, add_special_tokens=False)
            if theirs["input_ids"] != ours["input_ids"]:
                raise ValueError(f"SERAC counterfactual model {path}: its tokenizer differs from the backbone's; "
                                 "the counterfactual model must share the backbone's token ids")
            self.projection = nn.Linear(image_dim, self.lm.config.hidden_size, device=backbone.device,
                                        dtype=backbone.dtype)
        self.pad_id = backbone.tokenizer.pad_token_id
        self.image_token_id = backbone.image_token_id
        # What trains: every LM parameter, or the last `cf_layers` decoder layers; plus the projection.
        if h.cf_layers:
            stack = TextStack(self.lm)
            if not 0 < h.cf_layers <= len(stack):
                raise ValueError(f"SERAC: cf_layers must be in 1..{len(stack)} (0: all), got {h.cf_layers}")
            chosen = {id(p) for layer in list(stack.layers)[len(stack) - h.cf_layers:] for p in layer.parameters()}
            names = {n for n, p in self.named_parameters() if id(p) in chosen}
        else:
            names = {n for n, _ in self.named_parameters() if n.startswith("lm.")}
        names |= {n for n, _ in self.named_parameters() if n.startswith("projection.")}
        self.trainable = sorted(names)
        for p in self.parameters():
            p.requires_grad_(False)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.trainable}

    def logits(self, batch, image_noise: float = 0.0, gen: torch.Generator | None = None) -> torch.Tensor:
        backbone = self.backbone_ref[0]
        batch = backbone.to_device(batch)
        ids = batch.input_ids.masked_fill(batch.input_ids == self.image_token_id, self.pad_id)
        embeds = self.lm.get_input_embeddings()(ids)
        if batch.image_rows:
            feats = batch.image_features.to(embeds.dtype)
            if image_noise:
                # Gaussian noise at `image_noise` times each feature vector's own spread.
                noise = torch.randn(feats.shape, generator=gen).to(feats.device, feats.dtype)
                feats = feats + image_noise * feats.std(dim=-1, keepdim=True) * noise
            if self.projection is not None:
                feats = self.projection(feats.to(self.projection.weight.dtype)).to(embeds.dtype)
            mask = (batch.input_ids == self.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, feats)
        return self.lm(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits


def _answer_nll(logits: torch.Tensor, batch) -> torch.Tensor:
    target = batch.input_ids[:, 1:]
    mask = batch.answer_mask[:, 1:]
    return nn.functional.cross_entropy(logits[:, :-1][mask].float(), target[mask])


# ---------------------------------------------------------------- the editor
class SERAC(Editor):
    needs_training = True
    Hparams = SERACHparams
    float32_parts = {
        "scope": "a network of its own, trained from scratch in prepare: float32 weights keep its small Adam "
                 "updates (as mixed-precision training keeps float32 master weights); it reads the backbone's "
                 "image features through its own input layer and gives out only in-scope scores",
        "memory_embeddings": "the scope classifier's embeddings of the memorised edits",
        "last_scores": "the scope classifier's in-scope scores of the last `predict`",
    }

    @classmethod
    def local_paths(cls, hparams) -> dict[str, Path]:
        named = {"classifier": hparams.classifier if hparams.classifier != "tiny" else None,
                 "counterfactual": hparams.counterfactual if hparams.counterfactual != "backbone" else None}
        return {name: Path(value) for name, value in named.items() if value}

    @classmethod
    def prepare(cls, backbone: Backbone, hparams: SERACHparams, train_cases: list[EditCase], out_dir: Path,
                seed: int) -> dict:
        from safetensors.torch import save_file

        if not train_cases:
            raise ValueError("SERAC: no train cases")
        if hparams.classifier != "tiny":
            _local_dir(hparams.classifier, "classifier")
        if hparams.counterfactual != "backbone":
            _local_dir(hparams.counterfactual, "counterfactual model")
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        fit, validation = split_validation(train_cases, hparams.validation_share, seed)
        words = _vocabulary_words(backbone.tokenizer)
        if not words:
            raise ValueError("SERAC: the tokenizer has no alphabetic one-token words for vocabulary labels")
        t0 = time.time()
        classifier = ScopeClassifier(backbone, hparams).to(backbone.device)
        cls_losses = _train_classifier(classifier, fit, hparams, gen)
        t1 = time.time()
        cf = CounterfactualModel(backbone, hparams).to(backbone.device)
        cf_losses = _train_counterfactual(cf, backbone, fit, hparams, words, gen)
        t2 = time.time()

        tensors = {f"classifier.{k}": v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()}
        tensors.update({f"cf.{k}": v.detach().contiguous().cpu() for k, v in cf.trainable_parameters().items()})
        save_file(tensors, str(Path(out_dir) / WEIGHTS))
        meta = {"arch": {k: getattr(hparams, k) for k in ARCH_FIELDS}, "cf_trainable": cf.trainable,
                "cls_loss": cls_losses, "cf_loss": cf_losses}
        (Path(out_dir) / META).write_text(json.dumps(meta, indent=1) + "\n")
        n_cf_trainable = sum(p.numel() for p in cf.trainable_parameters().values())
        del classifier, cf, tensors  # the editor below loads its own copies (one LM copy at a time)
        figures = {}
        if validation:
            # The saved editor on the held-out cases: with their own labels, and with
            # vocabulary words swapped into them (answer words no train label need hold).
            editor = cls(backbone, asdict(hparams), out_dir)
            figures = {"validation": _edit_figures(editor, validation),
                       "validation_vocab": _edit_figures(editor, [replace(c, alt=_vocabulary_label(c.alt, words, gen))
                                                                  for c in validation])}
        summary = {"cls_loss_first": cls_losses[0], "cls_loss_last": cls_losses[-1], "cf_loss_first": cf_losses[0],
                   "cf_loss_last": cf_losses[-1], "cf_steps": hparams.cf_steps, "n_fit": len(fit), **figures,
                   "cls_s": t1 - t0, "cf_s": t2 - t1, "validation_s": time.time() - t2, "n_cf_trainable": n_cf_trainable}
        log.info("SERAC prepared: %s", summary)
        return summary

    def __init__(self, backbone, hparams=None, prepared=None):
        super().__init__(backbone, hparams, prepared)
        from safetensors.torch import load_file

        meta = json.loads((Path(prepared) / META).read_text(encoding="utf-8"))
        wanted = {k: getattr(self.hparams, k) for k in ARCH_FIELDS}
        if meta["arch"] != wanted:
            raise ValueError(f"SERAC: {prepared} was prepared with {meta['arch']}, the hparams ask for {wanted}: "
                             "prepare it again")
        tensors = load_file(str(Path(prepared) / WEIGHTS))
        self.scope = ScopeClassifier(backbone, self.hparams).to(backbone.device).eval()
        self.scope.load_state_dict({k[len("classifier."):]: v for k, v in tensors.items()
                                    if k.startswith("classifier.")})
        self.cf = CounterfactualModel(backbone, self.hparams).to(backbone.device).eval()
        cf_state = {k[len("cf."):]: v for k, v in tensors.items() if k.startswith("cf.")}
        missing = set(self.cf.trainable) - set(cf_state)
        if missing:
            raise ValueError(f"SERAC: {prepared} lacks counterfactual parameters {sorted(missing)[:3]}")
        self.cf.load_state_dict(cf_state, strict=False)
        for p in list(self.scope.parameters()) + list(self.cf.parameters()):
            p.requires_grad_(False)
        self.memory: list[EditCase] = []
        self.memory_embeddings: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None  # in-scope score of each row of the last `predict`
        self.last_routed: list[int] = []  # rows the counterfactual model answered (hard routing)

    @torch.no_grad()
    def edit(self, case: EditCase) -> None:
        e = self.scope.embed([edit_scope_input(case)])
        self.memory.append(case)
        self.memory_embeddings = e if self.memory_embeddings is None else torch.cat([self.memory_embeddings, e])

    def restore(self) -> None:
        self.memory = []
        self.memory_embeddings = None

    @torch.no_grad()
    def scope_scores(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the in-scope score (max over the memory) and the index of that edit."""
        log_s = ScopeClassifier.log_scores(self.scope.embed([scope_input(s) for s in samples]),
                                           self.memory_embeddings)
        best, index = log_s.max(dim=1)
        return best.exp(), index

    @torch.no_grad()
    def predict(self, samples: list[Sample]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        batch = self.backbone.encode(samples)
        base_logits = self.backbone.logits(batch)
        preds, targets = answer_predictions(base_logits, batch), batch.answer_targets()
        self.last_scores, self.last_routed = None, []
        if not self.memory:
            return preds, targets
        scores, index = self.scope_scores(samples)
        self.last_scores = scores.cpu()
        rows = (list(range(len(samples))) if self.hparams.routing == "soft"
                else [i for i in range(len(samples)) if float(scores[i]) > self.hparams.threshold])
        if not rows:
            return preds, targets
        cf_batch = self.backbone.encode([cf_sample(self.memory[int(index[i])], samples[i]) for i in rows])
        cf_logits = self.cf.logits(cf_batch)
        cf_targets = cf_batch.answer_targets()
        if self.hparams.routing == "hard":
            for j, (i, p) in enumerate(zip(rows, answer_predictions(cf_logits, cf_batch))):
                if not torch.equal(cf_targets[j], targets[i]):
                    raise ValueError("SERAC: the answer tokenizes differently after the edit context")
                preds[i] = p
            self.last_routed = rows
            return preds, targets
        # soft: log((1 - s) p_base + s p_cf) at the answer positions
        base_mask, cf_mask = batch.answer_mask[:, 1:], cf_batch.answer_mask[:, 1:]
        for j, i in enumerate(rows):
            p_base = base_logits[i, :-1][base_mask[i]].float().softmax(-1)
            p_cf = cf_logits[j, :-1][cf_mask[j]].float().softmax(-1)
            s = float(scores[i])
            preds[i] = ((1 - s) * p_base + s * p_cf).argmax(-1)
        return preds, targets


# ---------------------------------------------------------------- training
def _scope_pairs(cases: list[EditCase], gen: torch.Generator) -> tuple[list, list]:
    """(edit input, test input) pairs, positives and negatives, prompts only."""
    positives, negatives = [], []
    for i, c in enumerate(cases):
        edit = edit_scope_input(c)
        positives.append((edit, ScopeInput(c.image, edit_prompt(c.task, c.rephrase))))
        positives.append((edit, ScopeInput(c.image_rephrase, edit_prompt(c.task, c.src))))
        positives.append((edit, ScopeInput(c.image_rephrase, edit_prompt(c.task, c.rephrase))))
        negatives.append((edit, ScopeInput(None, c.loc)))
        negatives.append((edit, ScopeInput(c.m_loc, vqa_prompt(c.m_loc_q))))
        others = [o for o in cases if o.alt != c.alt]
        for _ in range(2 if others else 0):
            o = others[int(torch.randint(len(others), (1,), generator=gen))]
            negatives.append((edit, ScopeInput(o.image, edit_prompt(o.task, o.src))))
            negatives.append((edit, ScopeInput(o.image, edit_prompt(o.task, o.rephrase))))
    return positives, negatives


def _train_classifier(classifier: ScopeClassifier, cases: list[EditCase], h: SERACHparams,
                      gen: torch.Generator) -> list[float]:
    positives, negatives = _scope_pairs(cases, gen)
    classifier.train()
    opt = torch.optim.Adam([p for p in classifier.parameters() if p.requires_grad], lr=h.cls_lr)
    half = max(1, h.cls_batch // 2)
    losses = []
    for step in range(h.cls_steps):
        pos = [positives[int(i)] for i in torch.randint(len(positives), (half,), generator=gen)]
        neg = [negatives[int(i)] for i in torch.randint(len(negatives), (half,), generator=gen)]
        pairs = pos + neg
        a = classifier.embed([p[0] for p in pairs])
        b = classifier.embed([p[1] for p in pairs])
        log_s = -((a - b) ** 2).sum(-1)  # log s, s = exp(-d^2)
        # Balanced BCE: mean over positives of -log s, mean over negatives of -log(1 - s).
        loss_pos = -log_s[:half].mean()
        loss_neg = -torch.log(-torch.expm1(log_s[half:].clamp(max=-1e-6))).mean()
        loss = 0.5 * (loss_pos + loss_neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == h.cls_steps - 1:
            losses.append(round(float(loss.detach()), 5))
    classifier.eval()
    return losses


def _vocabulary_words(tokenizer, limit: int = 20000) -> list[str]:
    """Alphabetic vocabulary entries (among the first `limit` ids) that are one token when
    they follow a word and a space, as the words of an answer do."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(len(tokenizer), limit)) if i not in special]
    decoded = [w.strip() for w in tokenizer.batch_decode([[i] for i in ids])]
    candidates = [(i, w) for i, w in zip(ids, decoded) if w.isalpha()]
    head = tokenizer("a", add_special_tokens=False)["input_ids"]
    encoded = tokenizer([f"a {w}" for _, w in candidates], add_special_tokens=False)["input_ids"]
    return [w for (i, w), e in zip(candidates, encoded) if e == head + [i]]


def _vocabulary_label(template: str, words: list[str], gen: torch.Generator) -> str:
    """`template` (an answer string) with each of its words, and at least one, replaced by a
    random vocabulary word with probability 1/2: the shape of an answer, with any word in it."""
    parts = template.split()
    swap = torch.rand(len(parts), generator=gen) < 0.5
    swap[int(torch.randint(len(parts), (1,), generator=gen))] = True
    picks = torch.randint(len(words), (len(parts),), generator=gen)
    return " ".join(words[int(j)] if s else w for w, s, j in zip(parts, swap, picks))


def _answer_pools(cases: list[EditCase]) -> dict[str, list[str]]:
    """Per task, every answer string of the cases' records (edit labels, the backbone's own
    answers, locality answers), in first-seen order."""
    pools: dict[str, list[str]] = {}
    for c in cases:
        pool = pools.setdefault(c.task, [])
        for label in (c.alt, c.pred, c.loc_ans, c.m_loc_a):
            if label.strip() and label not in pool:
                pool.append(label)
    return pools


def _train_counterfactual(cf: CounterfactualModel, backbone: Backbone, cases: list[EditCase], h: SERACHparams,
                          words: list[str], gen: torch.Generator) -> list[float]:
    """Returns the training curve: the mean loss of each 50-step window."""
    pools = _answer_pools(cases)
    params = list(cf.trainable_parameters().values())
    for p in params:
        p.requires_grad_(True)
    cf.train()
    opt = torch.optim.Adam(params, lr=h.cf_lr)
    losses, window = [], []
    try:
        for step in range(h.cf_steps):
            samples = []
            for i in torch.randint(len(cases), (h.cf_batch,), generator=gen):
                case = cases[int(i)]
                pool = pools[case.task]
                u = float(torch.rand(1, generator=gen))
                template = pool[int(torch.randint(len(pool), (1,), generator=gen))]
                if u < h.cf_label_shuffle:
                    case = replace(case, alt=template)
                elif u < h.cf_label_shuffle + h.cf_label_vocab:
                    case = replace(case, alt=_vocabulary_label(template, words, gen))
                test = case_samples(case)[int(torch.randint(3, (1,), generator=gen))]  # edit, rephrase, image rephrase
                samples.append(cf_sample(case, test))
            batch = backbone.encode(samples)
            loss = _answer_nll(cf.logits(batch, h.cf_image_noise, gen), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.append(float(loss.detach()))
            if len(window) == 50 or step == h.cf_steps - 1:
                losses.append(round(sum(window) / len(window), 5))
                window = []
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        cf.eval()
    return losses


@torch.no_grad()
def _edit_figures(editor: SERAC, cases: list[EditCase]) -> dict:
    """Each case edited alone: the benchmark's mean scores of its five inputs
    (`unike.metrics.score_case`, locality against the unedited backbone), and the
    counterfactual model's answer NLL per token on its in-scope inputs given the edit."""
    totals: dict[str, float] = {}
    nll, n_tokens = 0.0, 0
    for case in cases:
        samples = case_samples(case)
        pre, _ = editor.predict(samples)  # empty memory: the backbone's own predictions
        editor.edit(case)
        preds, targets = editor.predict(samples)
        editor.restore()
        for key, value in score_case(dict(zip(ROWS, preds)), dict(zip(ROWS, targets)), dict(zip(ROWS, pre))).items():
            totals[key] = totals.get(key, 0.0) + value
        batch = editor.backbone.encode([cf_sample(case, s) for s in samples[:3]])
        n = int(batch.answer_mask[:, 1:].sum())
        nll += float(_answer_nll(editor.cf.logits(batch), batch)) * n
        n_tokens += n
    return {"n_cases": len(cases), **{k: round(v / len(cases), 4) for k, v in totals.items()},
            "cf_nll": round(nll / n_tokens, 5)}
