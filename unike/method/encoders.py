"""UniKE's knowledge disentangling (paper §3.3): per edited layer, a semantic encoder
EncSem: R^d -> R^d and a truthfulness encoder EncTru: R^d -> R^dt, trained with the
contrastive losses of Eq. 4 (truthfulness) and Eq. 5 (semantic).

- Eq. 4: in the truthfulness space every positive state is pulled towards the other
  positives and pushed from the negatives, and vice versa (a supervised contrastive loss).
- Eq. 5: the raw semantic state h_sem_i (last prompt token) is pulled towards
  EncSem(h_pos_i) and EncSem(h_neg_i) of its own triplet and pushed from those of other
  triplets, so a positive and its negative stay semantic neighbours.
- zeta_l = mean EncTru(h_pos) - mean EncTru(h_neg): the direction from hallucinated to
  truthful knowledge that regulates the values of the intrinsic neurons (Eq. 6).
- Figure 5a (`embed_spaces`, rule embed_spaces): EncSem and EncTru of h_pos and h_neg at
  the last edited layer, each space in 2-D by t-SNE (unike.method.tsne).

Similarity s is the cosine divided by a temperature (the paper leaves s unspecified).
"""

from __future__ import annotations

import logging
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderConfig:
    truth_dim: int = 64
    hidden: int = 256
    lr: float = 1e-4  # the paper's Adam lr
    steps: int = 1000
    batch_size: int = 128
    temperature: float = 0.1
    heldout_fraction: float = 0.2
    seed: int = 0


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class LayerEncoders(nn.Module):
    def __init__(self, d: int, cfg: EncoderConfig):
        super().__init__()
        self.sem = mlp(d, cfg.hidden, d)
        self.tru = mlp(d, cfg.hidden, cfg.truth_dim)


def truthfulness_loss(z_pos: torch.Tensor, z_neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 4: each representation against all others; same truthfulness is the positive set."""
    z = F.normalize(torch.cat([z_pos, z_neg]), dim=-1)
    n = z_pos.shape[0]
    sim = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    label = torch.cat([torch.zeros(n), torch.ones(n)]).to(z.device)
    same = (label[:, None] == label[None, :]) & ~self_mask
    log_prob = sim - sim.logsumexp(-1, keepdim=True)
    return -(log_prob.masked_fill(~same, float("-inf")).logsumexp(-1)).mean()


def semantic_loss(h_sem: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 5: h_sem_i against the encoded pos/neg of every triplet; its own pair is positive."""
    q = F.normalize(h_sem, dim=-1)
    keys = F.normalize(torch.cat([s_pos, s_neg]), dim=-1)
    sim = q @ keys.T / temperature  # (n, 2n)
    n = h_sem.shape[0]
    own = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1).to(sim.device)
    return -(sim.gather(1, own).logsumexp(-1) - sim.logsumexp(-1)).mean()


def _split(n: int, cfg: EncoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_held = max(1, int(n * cfg.heldout_fraction))
    return perm[n_held:], perm[:n_held]


@torch.no_grad()
def heldout_checks(enc: LayerEncoders, sem: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                   train_idx: torch.Tensor, held_idx: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """In the truthfulness space a linear probe (fitted on the training states) separates
    held-out positives from negatives; in the semantic space a positive's nearest
    neighbour among the encoded negatives is its own negative. Triplets with the same
    prompt and answers (other images of the same question) count as its own: `groups`."""
    z_train = torch.cat([enc.tru(pos[train_idx]), enc.tru(neg[train_idx])])
    y_train = torch.cat([torch.ones(len(train_idx)), torch.zeros(len(train_idx))])
    probe = nn.Linear(z_train.shape[1], 1)
    with torch.enable_grad():
        opt = torch.optim.LBFGS(probe.parameters(), max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(probe(z_train).squeeze(-1), y_train)
            loss.backward()
            return loss

        opt.step(closure)
    z_held = torch.cat([enc.tru(pos[held_idx]), enc.tru(neg[held_idx])])
    y_held = torch.cat([torch.ones(len(held_idx)), torch.zeros(len(held_idx))])
    probe_acc = float(((probe(z_held).squeeze(-1) > 0).float() == y_held).float().mean())
    g = groups[held_idx]

    def nn_own(p: torch.Tensor, n: torch.Tensor) -> float:
        nearest = (F.normalize(p, dim=-1) @ F.normalize(n, dim=-1).T).argmax(-1)
        return float((g[nearest] == g).float().mean())

    nn_encoded = nn_own(enc.sem(pos[held_idx]), enc.sem(neg[held_idx]))
    raw = nn_own(pos[held_idx], neg[held_idx])  # the same check on the raw states, for context
    return {"truth_probe_acc": probe_acc, "semantic_nn_own_negative": nn_encoded, "raw_nn_own_negative": raw,
            "n_heldout": int(len(held_idx))}


def train_layer_encoders(sem: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, groups: torch.Tensor,
                         cfg: EncoderConfig, name: str = "") -> tuple[LayerEncoders, torch.Tensor, dict]:
    """Train EncSem and EncTru for one layer; returns them, zeta and a report with curves
    and the held-out checks. zeta is computed over all states after training."""
    torch.manual_seed(cfg.seed)
    enc = LayerEncoders(sem.shape[1], cfg)
    train_idx, held_idx = _split(sem.shape[0], cfg)
    opt = torch.optim.Adam(enc.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = []
    for step in range(cfg.steps):
        idx = train_idx[torch.randint(len(train_idx), (min(cfg.batch_size, len(train_idx)),), generator=gen)]
        l_tru = truthfulness_loss(enc.tru(pos[idx]), enc.tru(neg[idx]), cfg.temperature)
        l_sem = semantic_loss(sem[idx], enc.sem(pos[idx]), enc.sem(neg[idx]), cfg.temperature)
        loss = l_tru + l_sem
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            curve.append({"step": step, "truthfulness": float(l_tru.detach()), "semantic": float(l_sem.detach())})
            if step % 250 == 0 or step == cfg.steps - 1:
                log.info("encoders %s step %d: truthfulness %.4f semantic %.4f", name, step, curve[-1]["truthfulness"],
                         curve[-1]["semantic"])
    with torch.no_grad():
        zeta = enc.tru(pos).mean(0) - enc.tru(neg).mean(0)
    checks = heldout_checks(enc, sem, pos, neg, train_idx, held_idx, groups)
    log.info("encoders %s held-out: %s", name, checks)
    return enc, zeta, {"curve": curve, "heldout": checks}


def load_layer_encoders(knowledge: Path, layer: int) -> LayerEncoders:
    """The trained encoders of one layer from `knowledge/encoders.safetensors` (eval mode, frozen)."""
    from safetensors.torch import load_file

    cfg = EncoderConfig(**json.loads((knowledge / "encoders.json").read_text(encoding="utf-8"))["config"])
    prefix = f"{layer}."
    weights = {k[len(prefix):]: v for k, v in load_file(str(knowledge / "encoders.safetensors")).items()
               if k.startswith(prefix) and not k.endswith(".zeta")}
    enc = LayerEncoders(weights["sem.0.weight"].shape[1], cfg)
    enc.load_state_dict(weights)
    return enc.eval().requires_grad_(False)


def pretrain_encoders(knowledge: Path, cfg: EncoderConfig) -> dict:
    """Train the encoders of every layer in `knowledge/hidden_states.safetensors`; write
    `encoders.safetensors` ("{layer}.sem.*", "{layer}.tru.*", "{layer}.zeta") and
    `encoders.json` (config, curves, held-out checks)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from unike.method.knowledge import load_triplets, triplet_groups

    groups = triplet_groups(load_triplets(knowledge / "triplets.json"))
    with safe_open(str(knowledge / "hidden_states.safetensors"), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        states = {k: f.get_tensor(k) for k in f.keys()}
    tensors, report = {}, {"layers": layers, "config": asdict(cfg), "per_layer": {}}
    for l in layers:
        enc, zeta, layer_report = train_layer_encoders(states[f"sem.{l}"], states[f"pos.{l}"], states[f"neg.{l}"],
                                                       groups, cfg, name=f"layer{l}")
        tensors.update({f"{l}.{k}": v.contiguous() for k, v in enc.state_dict().items()})
        tensors[f"{l}.zeta"] = zeta.contiguous()
        report["per_layer"][str(l)] = layer_report
    save_file(tensors, str(knowledge / "encoders.safetensors"), metadata={"layers": json.dumps(layers)})
    (knowledge / "encoders.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


SPACES_COLUMNS = ("space", "polarity", "triplet", "x", "y")


@torch.no_grad()
def embed_spaces(knowledge: Path, out_path: Path, n_points: int, tsne_cfg) -> dict:
    """Figure 5a: EncSem and EncTru applied to h_pos and h_neg of up to `n_points` triplets
    (a seeded uniform sample, `tsne_cfg.seed`) at the last edited layer, each space reduced
    to 2-D by t-SNE over its positives and negatives together. Writes `out_path` (Parquet,
    columns SPACES_COLUMNS; `triplet` indexes triplets.json) with the t-SNE summary (layer,
    KL per space, perplexity) as JSON under the schema metadata key "tsne"; returns it.

    The last edited layer: one figure shows one layer, and the deepest edited layer is the
    one whose states are nearest the answer. The encodings are L2-normalised before t-SNE:
    Eq. 4 and Eq. 5 compare them by cosine only, so their norms carry nothing trained."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors import safe_open

    from unike.method.tsne import tsne

    with safe_open(str(knowledge / "hidden_states.safetensors"), "pt") as f:
        layer = max(json.loads(f.metadata()["layers"]))
        pos, neg = f.get_tensor(f"pos.{layer}"), f.get_tensor(f"neg.{layer}")
    n = pos.shape[0]
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(tsne_cfg.seed))[:n_points].sort().values
    enc = load_layer_encoders(knowledge, layer)
    columns: dict[str, list] = {c: [] for c in SPACES_COLUMNS}
    summary = {"layer": layer, "n_triplets": int(len(chosen)), "n_available": int(n), "tsne": asdict(tsne_cfg),
               "kl": {}}
    for space, encoder in (("semantic", enc.sem), ("truthfulness", enc.tru)):
        z = F.normalize(torch.cat([encoder(pos[chosen]), encoder(neg[chosen])]), dim=-1)
        y, kl = tsne(z, tsne_cfg)
        summary["kl"][space] = kl
        log.info("spaces: %s space of layer %d, %d points, t-SNE KL %.4f", space, layer, z.shape[0], kl)
        for polarity, rows in (("positive", y[: len(chosen)]), ("negative", y[len(chosen):])):
            columns["space"] += [space] * len(chosen)
            columns["polarity"] += [polarity] * len(chosen)
            columns["triplet"] += chosen.tolist()
            columns["x"] += rows[:, 0].tolist()
            columns["y"] += rows[:, 1].tolist()
    types = (pa.string(), pa.string(), pa.int64(), pa.float64(), pa.float64())
    schema = pa.schema(list(zip(SPACES_COLUMNS, types)), metadata={"tsne": json.dumps(summary)})
    table = pa.table(columns, schema=schema)
    tmp = out_path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out_path)  # whole or absent: Snakemake must never see half a file
    return summary
