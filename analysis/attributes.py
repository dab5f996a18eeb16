"""The attribute prior of section 2.3 (Table 5), on the data's side: which attributes a run ties
to factors, their targets for a batch, and how well the factors predict them.

The model's side (the predictors on z_k, their loss, `Config.tied_attributes`) is in planrec.py,
section 2.3. train.py `--attribute-prior {user,item,both}` uses `tied_attributes` and
`AttributeTargets`; the evaluation reports `attribute_metrics`.
"""

import sys

import numpy as np
import torch

import planrec
from datasets.synthetic import load_ground_truth


# Integer attributes are unordered classes, except these of ML-1M and the synthetic world, whose
# codes are ordered bands: they are regressed on (the paper: "regression for attributes with
# ordered values"). Our choice of which. A generic log's text columns are always classes.
ORDERED_ATTRIBUTES = {"ml-1m": ("age",), "synthetic": ("age", "power", "price"),
                      "synthetic-ood": ("age", "power", "price")}


def attribute_tables(data, tie_private=False):
    """{'user.name': [n_users(, K)] array, 'item.name': [n_items + 1(, K)] array} of what the data
    knows; with tie_private, the synthetic world's latent purchasing power and price levels too."""
    tables = {f"user.{k}": np.asarray(v) for k, v in data.user_attrs.items()}
    tables.update({f"item.{k}": np.asarray(v) for k, v in data.item_attrs.items()})
    if tie_private:
        truth = load_ground_truth(data.folder)
        tables["user.power"] = truth["user_power"][data.raw_user_ids - 1]
        price = np.zeros(data.n_items + 1, dtype=np.int64)
        price[1:] = truth["item_price"][data.raw_item_ids[1:] - 1]
        tables["item.price"] = price
    return tables


def attribute_kind(name, table, dataset):
    """('class' | 'multilabel' | 'regression', size) of one attribute table of a dataset."""
    if table.ndim == 2:
        return "multilabel", table.shape[1]
    ordered = ORDERED_ATTRIBUTES.get(dataset, ())
    if np.issubdtype(table.dtype, np.integer) and name.split(".", 1)[1] not in ordered:
        return "class", int(table.max()) + 1
    return "regression", 1


def tied_attributes(data, prior, tie_private, n_user_factors, n_item_factors):
    """Config.tied_attributes for --attribute-prior: every attribute of the chosen sides, in the
    data's order, while the side has factors left."""
    tables = attribute_tables(data, tie_private)
    specs = []
    for side, room in (("user", n_user_factors), ("item", n_item_factors)):
        if prior not in (side, "both"):
            continue
        names = [name for name in tables if name.startswith(side + ".")]
        if not names:
            sys.exit(f"error: --attribute-prior {prior}: the {data.name} data has no {side} attributes")
        if len(names) > room:
            print(f"note: {len(names)} {side} attributes but {room} {side}-side factors: tying {names[:room]}")
        specs += [f"{name}:{kind}:{size}" for name in names[:room] for kind, size in [attribute_kind(name, tables[name], data.name)]]
    return tuple(specs)


class AttributeTargets:
    """The targets of the tied attributes for a batch: user attributes per row, item attributes
    per candidate; regression targets standardized with the table's mean and standard deviation
    (items without the padding row)."""

    def __init__(self, data, cfg, device, tie_private=False):
        tables = attribute_tables(data, tie_private)
        self.tables, self.scale = {}, {}
        for spec in cfg.tied_attributes:
            side, name, kind, _ = planrec.parse_attribute(spec)
            key = f"{side}.{name}"
            table = tables[key].astype(np.float32 if kind != "class" else np.int64)
            if kind == "regression":
                values = table[1:] if side == "item" else table
                mean, std = float(values.mean()), float(values.std()) or 1.0
                table = (table - mean) / std
                self.scale[key] = (mean, std)
            self.tables[key] = torch.as_tensor(table, device=device)

    def __call__(self, user, items):
        return {key: table[user] if key.startswith("user.") else table[items] for key, table in self.tables.items()}


def attribute_metrics(cfg, predictions, targets, scale):
    """Per tied attribute on one split: accuracy (classes; with the majority-class rate beside it),
    per-label accuracy (multi-label), RMSE in the attribute's own units (regression; with the
    RMSE of predicting the mean beside it). predictions/targets: {'side.name': [n, ...] arrays}."""
    metrics = {}
    for spec in cfg.tied_attributes:
        side, name, kind, _ = planrec.parse_attribute(spec)
        key = f"{side}.{name}"
        pred, target = predictions[key], targets[key]
        if kind == "class":
            target = target.astype(np.int64)
            counts = np.bincount(target.reshape(-1))
            metrics[key] = {"accuracy": float((pred.argmax(-1) == target).mean()),
                            "majority_rate": float(counts.max() / counts.sum())}
        elif kind == "multilabel":
            metrics[key] = {"label_accuracy": float(((pred > 0) == (target > 0.5)).mean()),
                            "all_zero_accuracy": float((target < 0.5).mean())}
        else:
            std = scale[key][1]
            metrics[key] = {"rmse": float(np.sqrt(((pred[..., 0] - target) ** 2).mean()) * std),
                            "baseline_rmse": float(np.sqrt(((target - target.mean()) ** 2).mean()) * std)}
    return metrics
