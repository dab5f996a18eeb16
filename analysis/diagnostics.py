"""What the analyses read off a trained model, beyond the ranking metrics: the personalization
statistics of an evaluation pass (metrics.json's "personalization" after every validation and test
pass) and the exported structures (structures.npz, `train.py --eval-only --export DIR`).

train.py's evaluation takes `SplitExtras` as its per-batch hook; experiments.py reads the rest.
"""

import sys
from pathlib import Path

import numpy as np
import torch

import planrec
from analysis.attributes import attribute_metrics


class SplitExtras:
    """The per-batch extras of one evaluation pass (train.run_split's `extras`): with the
    personalized branch 'uncertainty' [B, 101], 'distinct_masks' [B], 'mask_on_shared_support' [B],
    'mask_logits_A' [B, N, N], 'mask_logits_e' [B, N]; with tied attributes 'attribute.<side.name>'
    predictions and 'target.<side.name>' (user attributes per candidate). `summary` turns the
    concatenated pass into metrics."""

    def __init__(self, model, attributes=None):
        self.model, self.attributes, self.support = model, attributes, None
        if model.cfg.structure == "personalized":
            # the K_A entries of the shared A with the largest magnitude (among the allowed ones)
            magnitude = model.shared_A().detach().abs().flatten()
            self.support = torch.zeros_like(magnitude).scatter_(0, magnitude.topk(model.k_A).indices, 1.0
                                                                ).view_as(model.shared_A())

    def __call__(self, out, user, items):
        batch = {}
        if self.support is not None:
            mask_A, mask_e = out["mask_A"], out["mask_e"]
            batch["uncertainty"] = out["uncertainty"]
            batch["distinct_masks"] = distinct_masks(mask_A, mask_e)
            batch["mask_on_shared_support"] = (mask_A * self.support).sum((1, 2, 3)) / mask_A.sum((1, 2, 3))
            batch["mask_logits_A"], batch["mask_logits_e"] = out["mask_logits_A"], out["mask_logits_e"]
        if self.attributes is not None:
            targets = self.attributes(user, items)
            for key, prediction in out["attribute_predictions"].items():
                batch[f"attribute.{key}"] = prediction
                target = targets[key]
                if key.startswith("user."):
                    target = target[:, None].expand(items.shape + target.shape[1:])
                batch[f"target.{key}"] = target
        return batch

    def summary(self, result):
        """{'personalization': ..., 'attributes': ...} of one concatenated pass (what applies)."""
        metrics = {}
        if "uncertainty" in result:
            metrics["personalization"] = personalization_summary(self.model, result)
        if self.attributes is not None:
            keys = [k[len("attribute."):] for k in result if k.startswith("attribute.")]
            metrics["attributes"] = attribute_metrics(self.model.cfg, {k: result[f"attribute.{k}"] for k in keys},
                                                      {k: result[f"target.{k}"] for k in keys}, self.attributes.scale)
        return metrics


def distinct_masks(mask_A, mask_e):
    """[B]: how many distinct (M_A, M_e) pairs there are among each row's N_m samples."""
    masks = torch.cat([mask_A.flatten(2), mask_e], -1) > 0.5               # [B, S, N*N + N]
    same = (masks[:, :, None] == masks[:, None, :]).all(-1)                 # [B, S, S]
    earlier = torch.ones_like(same[0]).tril(-1)                             # s' < s
    return (~(same & earlier).any(-1)).sum(-1).float()                     # first occurrences


def personalization_summary(model, result):
    """What the personalized branch does on one split (issue: "say what it does")."""
    uncertainty = result["uncertainty"]
    A = model.shared_A().detach()
    alpha = model.cfg.dag_alpha or None
    return {
        "uncertainty_mean": float(uncertainty.mean()),
        "uncertainty_p10": float(np.percentile(uncertainty, 10)),
        "uncertainty_p50": float(np.percentile(uncertainty, 50)),
        "uncertainty_p90": float(np.percentile(uncertainty, 90)),
        "personal_weight_mean": float(1.0 - uncertainty.mean()),   # the weight of mean(Y*) in Eq. (17)
        "distinct_masks_mean": float(result["distinct_masks"].mean()),
        "mask_on_shared_support": float(result["mask_on_shared_support"].mean()),
        "dag": float(planrec.dag_penalty(A, alpha)),
        "acyclic": planrec.is_acyclic(A),
        "acyclic_threshold": planrec.EDGE_THRESHOLD,
    }


def short_personalization(p):
    return (f"uncertainty {p['uncertainty_mean']:.2f} (p10 {p['uncertainty_p10']:.2f}, p90 {p['uncertainty_p90']:.2f}), "
            f"{p['distinct_masks_mean']:.1f} distinct masks, {100 * p['mask_on_shared_support']:.0f}% on shared support, "
            f"L_dag {p['dag']:.3g}{' acyclic' if p['acyclic'] else ' cyclic'}")


@torch.no_grad()
def export_structures(model, data, device, out_dir, seed=0, draws=256, users_per_batch=256):
    """Write out_dir/structures.npz: what a reader needs to look at the learned structures.

    shared_A [N, N]          the A the model uses (zero diagonal; A[i, j] = effect of factor i on j)
    factor_names [N]         tied factors by attribute, the others user_k / item_k
    user_ids [U]             the dataset's own user ids
    keep_prob_A [U, N, N]    how often each dependency is kept, over `draws` draws of Eq. (12) from
    keep_prob_e [U, N]       the user's mask logits (rows sum to K_A and K_e). The paper's "masking
                             probability" (Fig. 4) is 1 - keep_prob (see PlanRec.mask_logits).
    mask_logits_A, mask_logits_e   Eq. (11)'s output for the user's test history
    uncertainty [U]          sigma(Var / beta) averaged over the user's test candidates
    activeness [U]           the user's training interactions
    """
    from train import run_split, write_npz   # train.py imports this module: import at call time
    cfg = model.cfg
    arrays = {"factor_names": np.array(planrec.factor_names(cfg)), "user_ids": data.raw_user_ids,
              "activeness": np.bincount(data.train_user, minlength=data.n_users)}
    if cfg.structure == "none":
        sys.exit("error: --export: a VAE base (structure none) has no structure to export")
    arrays["shared_A"] = model.shared_A().detach().cpu().numpy()
    if cfg.structure == "personalized":
        result = run_split(model, data, "test", device, seed, SplitExtras(model))
        logits_A, logits_e = (torch.as_tensor(result[k], device=device) for k in ("mask_logits_A", "mask_logits_e"))
        keep_A, keep_e = [], []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(logits_e), users_per_batch):
                sl = slice(start, start + users_per_batch)
                mask_A, mask_e = planrec.sample_masks(logits_A[sl], logits_e[sl], draws, model.k_A, cfg.k_e, cfg.tau)
                keep_A.append(mask_A.mean(1).cpu().numpy())
                keep_e.append(mask_e.mean(1).cpu().numpy())
        arrays.update(keep_prob_A=np.concatenate(keep_A), keep_prob_e=np.concatenate(keep_e),
                      mask_logits_A=result["mask_logits_A"], mask_logits_e=result["mask_logits_e"],
                      uncertainty=result["uncertainty"].mean(1))
    path = Path(out_dir) / "structures.npz"
    write_npz(path, arrays)
    print(f"wrote {path}: " + ", ".join(f"{k} {list(np.shape(v))}" for k, v in arrays.items()))
    return path
