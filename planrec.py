"""PlanRec: Personalized Latent Structure Learning for Recommendation (Zhang et al., IEEE TPAMI).

The whole model in one file, in the order of the paper's sections 2.3-2.6, then the loss and the
model (Algorithm 1). Search "Eq. (n)" to find the lines that compute equation n. Values the paper
states are marked "paper"; everything the paper leaves open is marked "our choice".

Everything here is the executable spec: plain torch, written for reading. kernels/ holds faster
implementations of two of its functions with the same signatures and numbers (the tests check
them against this file): personalized_scm (Triton) and factor_mlps (chunked, for CPU). PlanRec
takes them as scm_fn and factor_mlps_fn.

Shapes used throughout:
    B  (user, history) rows in a batch: a training position, or an evaluation target
    Q  user sequences (or chunks of them) in a batch, W items wide, for our encoder
    C  candidate items scored against each row (a positive and its negatives; 101 at evaluation)
    L  history length (50)
    D  item/user embedding size
    N  number of latent factors; the first N_u are user-side, the rest item-side
    d  size of each latent factor
    S  number of sampled personalized structures (N_m in the paper)
"""

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    n_users: int = 6040
    n_items: int = 3706
    embed_dim: int = 16            # paper: 8; ours 16, measured better on ML-1M (docs/RESULTS.md)
    history_len: int = 50          # paper: "the last 50 clicked items"
    # q_phi's first component. "paper" (PaperEncoder): section 3.1 as written, two-layer
    # self-attention over [history ; target] (every token attends to every token, absolute
    # positions), one FC layer on the last output embedding; its history sees the target, so
    # each row's window is encoded on its own for each candidate. "target_attention" (our choice,
    # the default, TargetAttentionEncoder): history tokens attend causally within a band (each to
    # itself and the history_len - 1 items before it, at every layer, as in SASRec) and never to a
    # target, with a learned bias per relative offset instead of absolute positions (our choice),
    # so a token's encoding does not depend on which row's window it falls in: each user sequence
    # is encoded once per step and shared by all its training positions and their candidates.
    # Each target attends to the history_len items before it and to itself; the FC layer also
    # reads an FM-style product of the history summary and the target. The paper allows "any
    # neural architecture that evolves interactions of the user and the target item" (section 2.3).
    encoder: str = "target_attention"
    n_layers: int = 2              # paper: "a two-layer self-attention network"
    n_heads: int = 1               # our choice (embeddings this narrow leave little to split)
    ffn_dim: int = 32              # our choice
    n_factors: int = 8             # N, our choice
    n_user_factors: int = 4        # N_u, our choice: factors 0..N_u-1 are user-side, the rest item-side
    factor_dim: int = 8            # d, our choice
    g_hidden: int = 16             # hidden width of each factor's g_vartheta MLP, our choice
    head_hidden: int = 32          # hidden width of MLP_R, MLP_R*, MLP_mask and the decoder, our choice
    tau: float = 1.0               # paper: Gumbel-softmax temperature
    beta: float = 0.002            # paper: uncertainty normalization in Eq. (17)
    n_mask_samples: int = 8        # N_m, paper: 8 on MovieLens (Table 3)
    k_A: int = 28                  # top-K of the dependency mask: half of the N(N-1) off-diagonal entries, our choice
    k_e: int = 6                   # top-K of the factor mask: 6 of 8 factors kept, our choice
    # u in Eq. (11). "id" (paper: "the embedding of user u"); "id+history" (our choice, the
    # default): the ID embedding plus the encoder's target-independent history summary, so that a
    # user's mask can follow what the history shows.
    mask_input: str = "id+history"
    prior_scale: float = 1.0       # b0 of the prior N(0, b0^2 I), our choice
    dag_alpha: float = 0.0         # alpha of Eq. (10); 0 means 1/N, our choice
    # Loss weights of Eq. (18). The paper weighs every term 1; ours weigh the regularizers 0.1,
    # measured better on ML-1M (docs/RESULTS.md): at 1 the KL and L_struct slow the ranking loss down.
    w_recommend: float = 1.0
    w_reconstruct: float = 0.1
    w_kl: float = 0.1
    w_struct: float = 0.1
    w_dag: float = 0.1
    # Ablation switches (paper Tables 7 and 8). structure: 'none' is the VAE base, 'shared' is
    # +SSL, 'personalized' is +PSL (with n_mask_samples=1) or the full model (n_mask_samples>1).
    structure: str = "personalized"
    # What MLP_R and MLP_R* read. "e_hat" is Eq. (15) as written (the default: the structure is the
    # bottleneck of every prediction). "both" (our option) also gives them the endogenous factors
    # e (e* for MLP_R*) that e-hat was computed from, so a factor without parents still reaches the
    # prediction, but the shared prediction then needs neither A nor g (e carries all of z).
    predict_from: str = "e_hat"
    reconstruction_reg: bool = True   # RecR: reconstruct (u, i) from e-hat instead of z
    dag_reg: bool = True              # AcyR: Eq. (10)
    dependency_reg: bool = True       # DepR: Eq. (9)
    # Blocked dependencies (paper Table 6): a comma-separated subset of u2u,u2i,i2u,i2i (u2i = from
    # user-side to item-side factors). Those blocks of A are exactly zero and never in a mask.
    # "i2u" alone is the direction prior "user factors cause item factors, not the reverse".
    drop_dependencies: str = ""
    # Disentanglement with prior (section 2.3, Table 5): which attributes are tied to factors, one
    # "side.name:kind:size" entry each (kind: class, multilabel or regression), in factor order per
    # side; train.py fills this from the data for --attribute-prior. Factor k of a side is tied to
    # that side's k-th entry; a small linear predictor on z_k learns the attribute (our choice).
    tied_attributes: tuple = ()
    w_attribute: float = 0.1       # weight of the attribute losses in Eq. (18), our choice
    # Our option, not the paper's (0 = off, the default): Eq. (9) applied to every personalized
    # structure too, L_struct* = mean_k ||e-hat*^k - e*^k||^2 with A fixed, so that each mask is
    # rewarded for keeping the dependencies that explain this user's factors and dropping those
    # that do not. In the paper the masks learn only from the balanced prediction (docs/EXPERIMENTS.md,
    # structure recovery: why the masks do not find the deviating users).
    w_personal_struct: float = 0.0
    # Our options for structure recovery (issue 20, docs/EXPERIMENTS.md), all off by default:
    # factor_sources: where the factors come from. "joint" (the paper, section 2.3: q_phi(z | u, i)
    # maps the encoder's joint (history, target) features to all N factors). "sides" (our choice):
    # side-separated factors, the user-side ones from the target-independent history summary alone
    # and the item-side ones from the target item's embedding alone, so that no factor sees both
    # sides and a user factor can meet an item factor only through A (Eq. (7)-(8)).
    factor_sources: str = "joint"
    # head_form: "joint" (Eq. (15) as written, one MLP over every factor). "additive" (our choice):
    # MLP_R = sum_k h_k([e_k ; e-hat_k]) (and MLP_R* alike), one small MLP per factor, summed as
    # logits: factors never interact inside the head, so every interaction between them passes
    # through A. The heads then always read [e_k ; e-hat_k] (predict_from does not apply).
    head_form: str = "joint"
    # w_personal_rec (our option, 0 = off): a per-user objective for the masks, the BCE of the mean
    # personalized prediction Y*_mu alone (A fixed, as in Eq. (13)-(14)), and the personalized
    # branch reads z detached, so that the encoder cannot absorb what this term asks of the masks.
    # In the paper the masks learn only through Eq. (17), where Y*_mu has at most half the weight.
    w_personal_rec: float = 0.0
    # mask_form (our option): how Eq. (12) samples the masks. "topk" (the paper): Gumbel top-K, exactly
    # K_A dependencies and K_e factors kept per sample, their straight-through gradient that of one
    # softmax over all entries (so each entry gets about 1/N^2 of it). "gates" (our choice): an
    # independent keep/drop gate per entry, kept where logit + logistic noise > 0 (a Gumbel-sigmoid,
    # straight-through with the gradient of sigmoid((logit + noise) / tau)); K_A and K_e do not
    # apply, and w_keep (below) makes every dropped entry cost something, so that a user's mask
    # drops a dependency only where that user's data pays for it.
    mask_form: str = "topk"
    # w_keep (our option, with mask_form="gates"): weight of the keep prior, the mean over users and
    # entries of -log sigmoid(logit), i.e. a Bernoulli prior that favours keeping every entry.
    w_keep: float = 0.0

    def __post_init__(self):
        for name, allowed in [("structure", ("none", "shared", "personalized")), ("predict_from", ("e_hat", "both")),
                              ("encoder", ("paper", "target_attention")), ("mask_input", ("id", "id+history")),
                              ("factor_sources", ("joint", "sides")), ("head_form", ("joint", "additive")),
                              ("mask_form", ("topk", "gates"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 < self.n_user_factors < self.n_factors:
            raise ValueError(f"n_user_factors must be in 1..n_factors-1, got {self.n_user_factors}")
        if not 1 <= self.k_A <= self.n_factors * (self.n_factors - 1):
            raise ValueError(f"k_A must be in 1..N(N-1)={self.n_factors * (self.n_factors - 1)}, got {self.k_A}")
        if not 1 <= self.k_e <= self.n_factors:
            raise ValueError(f"k_e must be in 1..N={self.n_factors}, got {self.k_e}")
        if self.w_personal_rec < 0 or self.w_keep < 0:
            raise ValueError(f"w_personal_rec and w_keep must be >= 0, got {self.w_personal_rec}, {self.w_keep}")
        if self.w_keep and self.mask_form != "gates":
            raise ValueError("w_keep is the keep prior of mask_form='gates'; set mask_form=gates or w_keep=0")
        if self.n_mask_samples < 1 or self.tau <= 0 or self.beta <= 0:
            raise ValueError(f"need n_mask_samples >= 1, tau > 0 and beta > 0; got {self.n_mask_samples}, {self.tau}, {self.beta}")
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by n_heads {self.n_heads}")
        self.tied_attributes = tuple(self.tied_attributes)
        if self.structure != "none" and not dependency_support(self).any():     # also rejects unknown blocks
            raise ValueError(f"drop_dependencies={self.drop_dependencies!r} leaves no dependency to learn")
        specs = [parse_attribute(s) for s in self.tied_attributes]
        n_user = sum(side == "user" for side, *_ in specs)
        if n_user > self.n_user_factors or len(specs) - n_user > self.n_factors - self.n_user_factors:
            raise ValueError(f"{n_user} user and {len(specs) - n_user} item attributes are tied, but there are "
                             f"{self.n_user_factors} user-side and {self.n_factors - self.n_user_factors} item-side factors")

    def to_dict(self):
        return asdict(self)


# Where our defaults above depart from what the paper states (section 3.1), the paper's values;
# train.py --paper-settings applies them with the paper's optimizer (Adagrad, lr 0.01, batch 4096).
PAPER_SETTINGS = dict(embed_dim=8, encoder="paper", mask_input="id", predict_from="e_hat",
                      w_reconstruct=1.0, w_kl=1.0, w_struct=1.0, w_dag=1.0)
# What the paper leaves open, so every run's values of these are ours (train.py prints them).
OUR_CHOICES = ("n_factors", "n_user_factors", "factor_dim", "g_hidden", "head_hidden", "n_heads", "ffn_dim",
               "k_A", "k_e", "prior_scale", "dag_alpha", "w_attribute")

# Named ablations (paper Tables 6-8): Config overrides that train.py (--preset), the tests and
# docs/RESULTS.md all refer to by these names. Table 8's regularizer rows add RecR, AcyR, DepR in turn
# onto PlanRec without regularizers; with all three it is "full".
PRESETS = {
    "vae_base": dict(structure="none"),                                   # Table 7: VAE
    "ssl": dict(structure="shared"),                                      # Table 7: +SSL
    "psl": dict(structure="personalized", n_mask_samples=1),              # Table 7: +PSL (N_m = 1)
    "full": dict(structure="personalized"),                               # Table 7: +Uncer, PlanRec
    "no_regs": dict(reconstruction_reg=False, dag_reg=False, dependency_reg=False),   # Table 8: Base
    "recr": dict(dag_reg=False, dependency_reg=False),                    # Table 8: +RecR
    "recr_acyr": dict(dependency_reg=False),                              # Table 8: +AcyR
    "no_reconstruction_reg": dict(reconstruction_reg=False),
    "no_dag_reg": dict(dag_reg=False),
    "no_dependency_reg": dict(dependency_reg=False),
    "ssl_no_regs": dict(structure="shared", reconstruction_reg=False, dag_reg=False, dependency_reg=False),
    "vae_base_regs_off": dict(structure="none", reconstruction_reg=False, dag_reg=False, dependency_reg=False),
    "no_u2i": dict(drop_dependencies="u2i,i2u"),                          # Table 6: w/o u2i
    "no_u2u_i2i": dict(drop_dependencies="u2u,i2i"),                      # Table 6: w/o u2u & i2i
    "direction_prior": dict(drop_dependencies="i2u"),                     # user -> item only (ours)
    "heads_on_e_and_e_hat": dict(predict_from="both"),                    # our option, see Config
}


# ------------------------------------------------------------------------------------------------
# Section 2.3: latent factor disentanglement, the encoder q_phi(z | u, i) (Eq. (2)-(6))
# ------------------------------------------------------------------------------------------------

# Eq. (2)-(4), the generative model and why q_phi approximates its posterior, are in PlanRec.encode;
# Eq. (5)-(6), the -ELBO we minimize (reconstruction + KL to the prior), in PlanRec.loss.
#
# Two encoders (Config.encoder). The paper's reads each row's 50-item window with its target token,
# every token attending to every other: nothing can be shared between rows or candidates. Ours
# (target_attention) encodes the history on its own, causally within a band of history_len items,
# so that a history token's encoding is the same in every row whose window it falls in: a batch is
# made of user sequences (data.RecData.train_sequences), each encoded once, and every training
# position of a sequence reads its window of the encoded history.

def mask_bias(allowed, dtype):
    """Additive attention bias from a boolean mask: 0 where allowed, -inf elsewhere. The same as a
    boolean mask, and faster in SDPA on CPU; made once per forward and shared by the layers."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def padding_bias(keep, dtype):
    """[B, 1, 1, T] attention bias from keep [B, T] (False at padding)."""
    return mask_bias(keep, dtype)[:, None, None, :]


def context_length(cfg):
    """How many items before a target its encoding reads: history_len with the paper's encoder. With
    ours, also the n_layers * (history_len - 1) items before the window that its oldest item's
    encoding reaches back to (a band of history_len per layer): a row-wise call needs this much history
    for its result to equal the sequence-batched one, and data.py starts every sequence chunk this
    far before its first target."""
    return cfg.history_len + (0 if cfg.encoder == "paper" else cfg.n_layers * (cfg.history_len - 1))


def history_windows(history, seq, end, segment, length):
    """Where each row's own history lies (what the paper's encoder reads of a sequence batch): the
    `length` items before its target, oldest first.

    history [Q, W] item ids (0 = padding); row b's target follows history[seq[b], end[b] - 1];
    segment [Q, W] or None: which sequence each token belongs to, where several lie end to end in
    one row. Returns window [B, length], indices into history.flatten(), and keep [B, length]:
    False for padding, before the row's start, and for tokens of another sequence."""
    Q, W = history.shape
    column = end[:, None] - length + torch.arange(length, device=history.device)
    window = seq[:, None] * W + column.clamp(min=0)
    keep = (column >= 0) & (history.flatten()[window] != 0)
    if segment is not None:
        flat = segment.flatten()
        keep &= flat[window] == flat[window[:, -1:]]          # the last item before the target is the row's own
    return window, keep


# Our encoder lays each row of the history out in G blocks of L = history_len tokens: the band of a
# token (itself and the L - 1 before it) lies in its block and the one before, so every attention of
# the history, and of the targets, is a batched product of a block of queries with the 2L keys of
# [previous block ; block]. A row (training position) is placed at the slot of the last item
# before its target: its window is that item's band, and its target attends to it from one
# position further on.

def with_previous_block(x, fill):
    """[Q, n, b, ...] blocks -> [Q * n, 2b, ...]: each block after the one before it in its row
    (the first block of a row after `fill`)."""
    previous = torch.cat([torch.full_like(x[:, :1], fill), x[:, :-1]], 1)
    return torch.cat([previous, x], 2).flatten(0, 1)


def band_offsets(length, device=None):
    """[length, 2 length]: how far query i of a block lies after key j of [previous block ; block],
    for blocks of `length` tokens (0 = itself, 1 = the token just before, ...; negative = after)."""
    i = torch.arange(length, device=device)
    return i[:, None] + length - torch.arange(2 * length, device=device)[None, :]


def band_windows(history, segment, length):
    """[Q * W / length, length, 2 length] bool, for history [Q, W] (W a multiple of `length`) in
    blocks: which keys of [previous block ; block] lie in the window of each token of the block,
    i.e. are real items among itself and the `length - 1` before it, of its own segment (default:
    its row)."""
    Q, W = history.shape
    blocks = lambda x: x.view(Q, W // length, length)
    segment = torch.zeros_like(history) if segment is None else segment
    offset = band_offsets(length, history.device)
    key_real = with_previous_block(blocks(history), 0) != 0                        # [G, 2L]
    key_segment = with_previous_block(blocks(segment), -1)
    return ((offset >= 0) & (offset < length) & key_real[:, None, :]
            & (blocks(segment).flatten(0, 1)[:, :, None] == key_segment[:, None, :]))


def band_bias(windows, dtype):
    """[G, 1, L, 2L]: the attention bias of the history tokens of each block (windows =
    band_windows): 0 on each token's window and on itself (a padding token attends only itself, so
    that no row of the softmax is empty), -inf elsewhere. Made once per forward."""
    itself = band_offsets(windows.shape[1], windows.device) == 0
    return mask_bias(windows | itself, dtype)[:, None]


def window_mean(pairs, window, slot):
    """[B, D]: each row's mean over its window, from pairs [G, 2L, D] (with_previous_block of the
    tokens), window [G, M, 2L] (the windows of the M slots of each block that rows can take) and
    slot [B] (each row's slot among G * M). A row with an empty window gets zeros."""
    weights = window.to(pairs.dtype)
    means = (weights / weights.sum(-1, keepdim=True).clamp(min=1)) @ pairs        # [G, M, D]
    return means.flatten(0, 1).index_select(0, slot)


class SelfAttentionLayer(nn.Module):
    """One pre-norm self-attention block: every token attends to every non-padding token."""

    def __init__(self, dim, n_heads, ffn_dim):
        super().__init__()
        self.n_heads = n_heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))

    def _heads(self, x):   # [..., T, D] -> [..., H, T, D/H]
        return x.unflatten(-1, (self.n_heads, -1)).transpose(-2, -3)

    def _merge(self, x):   # [..., H, T, D/H] -> [..., T, D]
        return x.transpose(-2, -3).flatten(-2)

    def forward(self, tokens, bias):
        """tokens [B, T, D]; bias [B, 1, 1, T] = padding_bias (never every token of a row padding)."""
        q, k, v = map(self._heads, self.qkv(self.norm_attn(tokens)).chunk(3, -1))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        tokens = tokens + self.out(self._merge(attended))
        return tokens + self.ffn(self.norm_ffn(tokens))


class TargetAttentionLayer(SelfAttentionLayer):
    """The same block for our encoder (Config.encoder). History tokens attend causally within the
    band (each to itself and the history_len - 1 tokens before it, as in SASRec), never to a target:
    the history half is computed once per user sequence and read by every row of it, the positive,
    its negatives and all 101 evaluation candidates. Each target token attends to the history_len
    tokens before it and to itself. Positions enter as a learned bias per head and offset (0 = the
    token itself or, for a target, itself; 1 = the token just before; ... history_len), never as
    absolute slots of a window, so that nothing depends on which window a token falls in."""

    def __init__(self, dim, n_heads, ffn_dim, history_len):
        super().__init__(dim, n_heads, ffn_dim)
        self.history_len = history_len
        self.offset_bias = nn.Parameter(torch.zeros(n_heads, history_len + 1))
        # the offset of each key of [previous block ; block] from a history token, and from a target
        # (one item later), clipped into the table (the entries outside the band are masked anyway)
        offset = band_offsets(history_len)
        self.register_buffer("history_offset", offset.clamp(0, history_len - 1), persistent=False)
        self.register_buffer("target_offset", offset.clamp(0, history_len - 1) + 1, persistent=False)

    def history_half(self, history, bias):
        """history [Q, W, D] (W a multiple of history_len); bias [G, 1, L, 2L] (the band of each
        block's tokens, G = Q * W / L blocks). Returns the history's next layer [Q, W, D] and this
        layer's keys and values [G, 2L, 2D] of [previous block ; block]."""
        Q, W, D = history.shape
        L = self.history_len
        q, kv = self.qkv(self.norm_attn(history)).split([D, 2 * D], -1)
        kv = with_previous_block(kv.view(Q, W // L, L, 2 * D), 0.0)                     # [G, 2L, 2D]
        k, v = map(self._heads, kv.chunk(2, -1))
        attended = F.scaled_dot_product_attention(self._heads(q.reshape(-1, L, D)), k, v,
                                                  attn_mask=bias + self.offset_bias[:, self.history_offset])
        history = history + self.out(self._merge(attended).view(Q, W, D))
        return history + self.ffn(self.norm_ffn(history)), kv

    def target_half(self, target, kv, window_bias, slot):
        """target [B, C, D] (C candidates share row b's history); kv of history_half; window_bias
        [G, 1, M, 2L] (mask_bias of the windows of the M slots of each block that rows can take);
        slot [B], each row's slot among G * M."""
        (G, M), (B, C, D) = window_bias.shape[::2], target.shape
        L = self.history_len
        # the rows' targets at their slots (an empty slot computes on zeros and is never read)
        qkv = self.qkv(self.norm_attn(target))
        qkv = qkv.new_zeros(G * M, C, 3 * D).index_copy(0, slot, qkv)
        qt, kt, vt = map(self._heads, qkv.view(G, M * C, 3 * D).chunk(3, -1))          # [G, H, M*C, D/H]
        kh, vh = map(self._heads, kv.chunk(2, -1))                                      # [G, H, 2L, D/H]
        scale = 1.0 / math.sqrt(qt.shape[-1])
        # target -> [its window (offsets history_len .. 1) ; itself (offset 0)]
        window_bias = window_bias + self.offset_bias[:, self.target_offset[L - M:]]      # [G, H, M, 2L]
        att_h = (qt @ kh.transpose(-1, -2)).view(G, -1, M, C, 2 * L) * scale + window_bias[:, :, :, None]
        att_t = (qt * kt).sum(-1, keepdim=True) * scale + self.offset_bias[:, :1, None]  # [G, H, M*C, 1]
        w = torch.cat([att_h.flatten(2, 3), att_t], -1).softmax(-1)
        t = w[..., :-1] @ vh + w[..., -1:] * vt
        target = target + self.out(self._merge(t).reshape(G * M, C, D).index_select(0, slot))
        return target + self.ffn(self.norm_ffn(target))

    def forward(self, history, target, bias, window_bias, slot):
        history_next, kv = self.history_half(history, bias)
        return history_next, self.target_half(target, kv, window_bias, slot)


class PaperEncoder(nn.Module):
    """q_phi(z | u, i) as section 3.1 has it: two-layer self-attention over [history ; target] per
    candidate (every token attends to every token), then an FC layer on the last output embedding,
    reshaped to N factors (mean and log-variance of each)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.position = nn.Parameter(torch.zeros(cfg.history_len + 1, D))
        self.layers = nn.ModuleList(SelfAttentionLayer(D, cfg.n_heads, cfg.ffn_dim) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(D)
        self.to_factors = nn.Linear(D, 2 * cfg.n_factors * cfg.factor_dim)   # paper: the FC layer
        self.n_factors, self.factor_dim = cfg.n_factors, cfg.factor_dim

    def forward(self, history_emb, history_pad, target_emb):
        """history_emb [B, L, D], each row's own window; history_pad [B, L] (True = padding);
        target_emb [B, C, D]. Returns mean, logvar [B, C, N, d] and a target-independent user
        summary [B, D] (the mean history embedding, used only by mask_input="id+history")."""
        B, L, D = history_emb.shape
        C = target_emb.shape[1]
        h = history_emb + self.position[:L]
        t = target_emb + self.position[L]
        history_keep = ~history_pad
        keep = history_keep.unsqueeze(-1).to(h.dtype)
        # [history ; target] per candidate: the history tokens see the target too, so nothing is
        # shared between a row's candidates.
        tokens = torch.cat([h[:, None].expand(B, C, L, D), t[:, :, None]], 2).reshape(B * C, L + 1, D)
        token_keep = torch.cat([history_keep, history_keep.new_ones(B, 1)], 1)
        token_keep = token_keep[:, None].expand(B, C, L + 1).reshape(B * C, L + 1)
        token_bias = padding_bias(token_keep, h.dtype)
        for layer in self.layers:
            tokens = layer(tokens, token_bias)
        features = self.norm(tokens[:, -1]).reshape(B, C, D)
        summary = (history_emb * keep).sum(1) / keep.sum(1).clamp(min=1)
        stats = self.to_factors(features).unflatten(-1, (2, self.n_factors, self.factor_dim))
        return stats[..., 0, :, :], stats[..., 1, :, :], summary


class TargetAttentionEncoder(nn.Module):
    """q_phi(z | u, i), our choice (Config.encoder): TargetAttentionLayers, then the FC layer on the
    target's last output embedding and an FM-style product of the history summary with the target
    embedding (so a dot-product preference, the strongest signal in next-item data, is linear in its
    input), reshaped to N factors (mean and log-variance of each)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.history_len = cfg.history_len
        self.layers = nn.ModuleList(TargetAttentionLayer(D, cfg.n_heads, cfg.ffn_dim, cfg.history_len)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(D)
        self.to_factors = nn.Linear(2 * D, 2 * cfg.n_factors * cfg.factor_dim)
        self.n_factors, self.factor_dim = cfg.n_factors, cfg.factor_dim

    def encode_history(self, history_emb, bias):
        """The history half alone: history_emb [Q, W, D] -> its encoding [Q, W, D], in which every
        token's encoding depends only on itself and the items before it in its band."""
        h = history_emb
        for layer in self.layers:
            h, _ = layer.history_half(h, bias)
        return self.norm(h)

    def forward(self, history_emb, bias, window, slot, target_emb):
        """history_emb [Q, W, D] of the batch's sequences (W a multiple of history_len); bias [G, 1,
        L, 2L] = the mask_bias of each block's band, with every token allowed itself; window [G, M,
        2L] (band_windows of the M slots of each block that rows can take); slot [B], each row's
        slot among G * M; target_emb [B, C, D].

        Returns mean, logvar [B, C, N, d] and the target-independent summary [B, D] of each row:
        the mean encoding of its window."""
        L = self.history_len
        h, t = history_emb, target_emb
        window_bias = mask_bias(window, t.dtype)[:, None]
        for layer in self.layers:
            h, t = layer(h, t, bias, window_bias, slot)
        Q, W, D = h.shape
        summary = window_mean(with_previous_block(self.norm(h).view(Q, W // L, L, D), 0.0), window, slot)
        features = torch.cat([self.norm(t), summary[:, None, :] * target_emb], -1)
        stats = self.to_factors(features).unflatten(-1, (2, self.n_factors, self.factor_dim))
        return stats[..., 0, :, :], stats[..., 1, :, :], summary


# ------------------------------------------------------------------------------------------------
# Section 2.3, disentanglement with prior: factors tied to user/item attributes
# ------------------------------------------------------------------------------------------------

ATTRIBUTE_KINDS = ("class", "multilabel", "regression")


def parse_attribute(spec):
    """'user.gender:class:2' -> ('user', 'gender', 'class', 2)."""
    try:
        name, kind, size = spec.split(":")
        side, attribute = name.split(".", 1)
        size = int(size)
    except ValueError:
        raise ValueError(f"tied attribute {spec!r}: expected 'side.name:kind:size'") from None
    if side not in ("user", "item") or kind not in ATTRIBUTE_KINDS or size < 1:
        raise ValueError(f"tied attribute {spec!r}: side must be user or item, kind one of {ATTRIBUTE_KINDS}, size >= 1")
    return side, attribute, kind, size


def tied_factor_index(cfg):
    """The factor each entry of cfg.tied_attributes is tied to (user entries from factor 0, item
    entries from factor N_u, each side in its listed order)."""
    index, next_free = [], {"user": 0, "item": cfg.n_user_factors}
    for side, *_ in map(parse_attribute, cfg.tied_attributes):
        index.append(next_free[side])
        next_free[side] += 1
    return index


def factor_names(cfg):
    """Tied factors are named after their attribute ('user.gender'), the others user_k / item_k."""
    names = [f"user_{k}" if k < cfg.n_user_factors else f"item_{k}" for k in range(cfg.n_factors)]
    for k, (side, attribute, *_) in zip(tied_factor_index(cfg), map(parse_attribute, cfg.tied_attributes)):
        names[k] = f"{side}.{attribute}"
    return names


class AttributePredictors(nn.Module):
    """Disentanglement with prior (section 2.3): one linear predictor per tied attribute, reading
    only its own factor z_k (classification for unordered values, multi-label for genres,
    regression for ordered values). Linear is our choice: the factor itself must carry the
    attribute, not a deep predictor."""

    def __init__(self, cfg):
        super().__init__()
        self.specs = [parse_attribute(s) for s in cfg.tied_attributes]
        self.factor_index = tied_factor_index(cfg)
        self.heads = nn.ModuleList(nn.Linear(cfg.factor_dim, size) for *_, size in self.specs)

    def forward(self, z):
        """z [B, C, N, d] -> {'side.name': predictions [B, C, size]}."""
        return {f"{side}.{name}": head(z[..., k, :])
                for (side, name, _, _), k, head in zip(self.specs, self.factor_index, self.heads)}

    def loss(self, predictions, targets):
        """Mean over the tied attributes of each one's loss. targets: {'side.name': tensor}; user
        attributes [B] (or [B, K] multi-hot), item attributes [B, C] (or [B, C, K]); regression
        targets standardized."""
        losses = []
        for side, name, kind, _ in self.specs:
            key = f"{side}.{name}"
            pred, target = predictions[key], targets[key]
            if side == "user":                          # one value per row, shared by its candidates
                target = target[:, None].expand(pred.shape[:2] + target.shape[1:])
            if kind == "class":
                losses.append(F.cross_entropy(pred.flatten(0, 1), target.flatten(0, 1).long()))
            elif kind == "multilabel":
                losses.append(F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype)))
            else:
                losses.append(F.mse_loss(pred.squeeze(-1), target.to(pred.dtype)))
        return torch.stack(losses).mean()


# ------------------------------------------------------------------------------------------------
# Section 2.4: shared structure learning (Eq. (7)-(10))
# ------------------------------------------------------------------------------------------------

DEPENDENCY_BLOCKS = ("u2u", "u2i", "i2u", "i2i")


def dependency_blocks(text):
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in DEPENDENCY_BLOCKS]
    if unknown:
        raise ValueError(f"drop_dependencies: unknown block(s) {unknown}; use a comma-separated subset of "
                         f"{','.join(DEPENDENCY_BLOCKS)}")
    return set(names)


def dependency_support(cfg):
    """[N, N] bool: the entries of A the model may use (A[i, j] = effect of factor i on factor j):
    off-diagonal, and outside every dropped block."""
    N, Nu = cfg.n_factors, cfg.n_user_factors
    user = torch.arange(N) < Nu
    allowed = ~torch.eye(N, dtype=torch.bool)
    sides = {"u2u": (user, user), "u2i": (user, ~user), "i2u": (~user, user), "i2i": (~user, ~user)}
    for block in dependency_blocks(cfg.drop_dependencies):
        parent, child = sides[block]
        allowed &= ~(parent[:, None] & child[None, :])
    return allowed


def scm(z, A):
    """Eq. (7): e = (I - A^T)^-1 z, for z [..., N, d] and one shared A [N, N]."""
    N = A.shape[0]
    # inv_ex: inv without its check for a singular matrix, which waits for a GPU (a NaN shows in the loss)
    inverse = torch.linalg.inv_ex(torch.eye(N, dtype=A.dtype, device=A.device) - A.T).inverse
    return torch.einsum("ij,...jd->...id", inverse, z)


def factor_mlps(coefficient, e, w1, b1, w2, b2):
    """g_vartheta of Eq. (8) and (14): e-hat_i = g_i(A_i * e), one small MLP g_i per factor (one
    hidden layer, our choice), all N evaluated together. kernels.factor_mlps computes the same.

    coefficient [..., N(parent), N(child)] (A, or a masked A); e [..., N, d]; the weights of the
    N MLPs w1 [N, N*d, H], b1 [N, 1, H], w2 [N, H, d], b2 [N, 1, d]. Returns e-hat [..., N, d]."""
    N, d = e.shape[-2:]
    batch = torch.broadcast_shapes(coefficient.shape[:-2], e.shape[:-2])
    # Factor i's input A_i * e: x[i, ..., (j, d)] = coefficient[..., j, i] * e[..., j, d], its
    # parents' factors scaled by their effect on it, every other factor zero (N x d numbers).
    x = coefficient.expand(*batch, N, N).movedim(-1, 0)[..., None] * e          # [N, ..., N, d]
    x = x.reshape(N, -1, N * d)                                                # [N, M, N*d]
    hidden = F.gelu(torch.baddbmm(b1, x, w1))                                  # [N, M, H]
    out = torch.baddbmm(b2, hidden, w2)                                        # [N, M, d]
    return out.reshape(N, *batch, d).movedim(0, -2)


class FactorMLPs(nn.Module):
    """g_vartheta of Eq. (8) and (14): the parameters of the N factor MLPs. fn computes g from
    them (factor_mlps above by default, or kernels.factor_mlps; both share one signature)."""

    def __init__(self, n_factors, factor_dim, hidden, fn=None):
        super().__init__()
        n_in = n_factors * factor_dim
        self.w1 = nn.Parameter(torch.randn(n_factors, n_in, hidden) / math.sqrt(n_in))
        self.b1 = nn.Parameter(torch.zeros(n_factors, 1, hidden))
        self.w2 = nn.Parameter(torch.randn(n_factors, hidden, factor_dim) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(n_factors, 1, factor_dim))
        self.fn = fn or factor_mlps

    def forward(self, coefficient, e):
        """coefficient [..., N(parent), N(child)]; e [..., N, d] -> e-hat [..., N, d]."""
        return self.fn(coefficient, e, self.w1, self.b1, self.w2, self.b2)


# Eq. (9), L_struct = ||e-hat - e||^2, is a term of the loss: PlanRec.loss.

def dag_penalty(A, alpha=None):
    """Eq. (10): L_dag = tr((I + alpha A*A)^N) - N; zero exactly when A is acyclic (NOTEARS-style, [17]).

    alpha defaults to 1/N (our choice: keeps the spectral radius of I + alpha A*A moderate for
    entries of order 1)."""
    n = A.shape[-1]
    alpha = 1.0 / n if alpha is None else alpha
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    M = torch.linalg.matrix_power(eye + alpha * A * A, n)
    return torch.diagonal(M, dim1=-2, dim2=-1).sum(-1) - n


# |A| below this counts as no edge when we ask whether a learned A is a DAG (our choice: A's
# entries are of order 0.1-1 after training, and L_dag rarely reaches exactly zero).
EDGE_THRESHOLD = 0.05


def is_acyclic(A, threshold=EDGE_THRESHOLD):
    """Whether the graph {i -> j : |A[i, j]| > threshold} has no cycle (its adjacency is nilpotent)."""
    adjacency = (A.detach().abs() > threshold).double()
    return bool(torch.linalg.matrix_power(adjacency, A.shape[-1]).abs().sum() == 0)


# ------------------------------------------------------------------------------------------------
# Section 2.5: personalized structure learning (Eq. (11)-(14))
# ------------------------------------------------------------------------------------------------

# Eq. (11), the mask scores M-bar = MLP_mask(u), is PlanRec.mask_logits.

# A logit that Eq. (12) never picks: blocked dependencies get it (finite, unlike the diagonal's
# -inf, so that the eager function and the Triton kernel treat it alike: exp(-1e4) is 0 in float32).
NEVER_LOGIT = -1e4


def gumbel_topk(logits, k, tau=1.0, uniform=None):
    """Eq. (12) with the straight-through top-K of [26], over the last dimension.

    Forward: exactly k ones (the k largest of logits + G) and zeros elsewhere.
    Backward: the gradient of softmax((logits + G) / tau), G = -log(-log U).
    The logits play the role of log(M-bar) in Eq. (12). Entries with logit -inf are never chosen
    while at least k entries are finite.
    """
    if uniform is None:
        uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    gumbel = -torch.log(-torch.log(uniform))
    perturbed = logits + gumbel
    # top-K of the perturbed logits = top-K of the soft probabilities, for any tau > 0; the mask
    # needs the set of the k largest, not their order (unsorted is faster on CPU, issue 12)
    index = perturbed.topk(k, dim=-1, sorted=False).indices
    hard = torch.zeros_like(perturbed).scatter_(-1, index, 1.0)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return hard                      # inference: the softmax only matters for the gradient
    soft = torch.softmax(perturbed if tau == 1 else perturbed / tau, dim=-1)
    return hard + (soft - soft.detach())   # parenthesized: the forward stays exactly 0/1


def sample_masks(logits_A, logits_e, n_samples, k_A, k_e, tau=1.0, uniform_A=None, uniform_e=None):
    """Eq. (12) for both masks, n_samples times: mask_A [B, S, N, N] (never on the diagonal),
    mask_e [B, S, N]. logits_A [B, N, N], logits_e [B, N]; uniform_A [B, S, N, N] and
    uniform_e [B, S, N] optionally fix the noise."""
    B, N = logits_e.shape
    eye = torch.eye(N, dtype=torch.bool, device=logits_A.device)
    # The mask lives on off-diagonal entries only: a -inf logit is never picked and has zero probability.
    logits_A = logits_A.masked_fill(eye, float("-inf"))
    logits_A = logits_A[:, None].expand(B, n_samples, N, N).reshape(B, n_samples, N * N)
    logits_e = logits_e[:, None].expand(B, n_samples, N)
    if uniform_A is not None:
        uniform_A = uniform_A.reshape(B, n_samples, N * N)
    mask_A = gumbel_topk(logits_A, k_A, tau, uniform_A).reshape(B, n_samples, N, N)
    mask_e = gumbel_topk(logits_e, k_e, tau, uniform_e)
    return mask_A, mask_e


def gumbel_gates(logits, tau=1.0, uniform=None):
    """Our option (Config.mask_form = "gates"): an independent keep/drop gate per entry, the
    straight-through Gumbel-sigmoid. Forward: 1 where logits + L > 0, L = log U - log(1 - U) logistic
    noise, else 0 (so P(keep) = sigmoid(logits); a -inf logit is never kept). Backward: the gradient
    of sigmoid((logits + L) / tau)."""
    if uniform is None:
        uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny, max=1 - torch.finfo(logits.dtype).eps)
    perturbed = logits + torch.log(uniform) - torch.log1p(-uniform)
    hard = (perturbed > 0).to(logits.dtype)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return hard
    soft = torch.sigmoid(perturbed / tau)
    return hard + (soft - soft.detach())


def sample_gates(logits_A, logits_e, n_samples, tau=1.0):
    """Eq. (12) with gumbel_gates (our option) for both masks, n_samples times: mask_A [B, S, N, N]
    (never on the diagonal), mask_e [B, S, N]."""
    B, N = logits_e.shape
    eye = torch.eye(N, dtype=torch.bool, device=logits_A.device)
    mask_A = gumbel_gates(logits_A.masked_fill(eye, float("-inf"))[:, None].expand(B, n_samples, N, N), tau)
    return mask_A, gumbel_gates(logits_e[:, None].expand(B, n_samples, N), tau)


def masked_scm(z, A, mask_A, mask_e):
    """Eq. (13) for every sample: e* [B, S, N, d] with (I - (mask_A * A)^T) e* = mask_e * z, for
    z [B, N, d], A [N, N], mask_A [B, S, N, N], mask_e [B, S, N]. The masked graph need not be
    acyclic while training, so this is a general solve, not a triangular one."""
    N = z.shape[1]
    system = torch.eye(N, dtype=z.dtype, device=z.device) - (mask_A * A).transpose(-1, -2)
    return torch.linalg.solve_ex(system, mask_e[..., None] * z[:, None]).result   # no check that waits for a GPU


def personalized_scm(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau=1.0,
                     uniform_A=None, uniform_e=None):
    """Eq. (11)-(13): sample n_samples personalized masks and solve the masked SCM for each.

    z [B, N, d]; A [N, N] (A[i, j] = effect of factor i on factor j); logits_A [B, N, N] (diagonal
    ignored); logits_e [B, N]; uniform_A [B, S, N, N] and uniform_e [B, S, N] optionally fix the noise.
    Returns e_star [B, S, N, d], mask_A [B, S, N, N] (0/1 forward, zero diagonal), mask_e [B, S, N],
    where (I - (mask_A * A)^T) e_star = mask_e * z for every sample.
    """
    B, N, d = z.shape
    if not 1 <= k_A <= N * (N - 1):
        raise ValueError(f"k_A must be in 1..N(N-1)={N * (N - 1)}, got {k_A}")
    if not 1 <= k_e <= N:
        raise ValueError(f"k_e must be in 1..N={N}, got {k_e}")
    mask_A, mask_e = sample_masks(logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e)  # Eq. (12)
    return masked_scm(z, A, mask_A, mask_e), mask_A, mask_e                                          # Eq. (13)


# Eq. (14), e-hat*_i = g((M^(A)_i * A_i) * (M^(e) * e*)), is g of Eq. (8) on masked coefficients:
# PlanRec.personalize_and_balance.


# ------------------------------------------------------------------------------------------------
# Section 2.6: balancing personalization and shared knowledge (Eq. (15)-(17))
# ------------------------------------------------------------------------------------------------

# Eq. (15), the predictions Y^c = MLP_R(e-hat) and Y* = MLP_R*(e-hat*), is PlanRec.predict.

def balance(y_shared, y_samples, beta):
    """Eq. (16)-(17): mix the shared prediction and the mean personalized one by the uncertainty.

    y_samples holds the N_m samples in its last dimension. Returns (y, uncertainty) with
    uncertainty = sigmoid(Var / beta), the weight of the shared prediction.

    True to the paper and easy to miss: Var >= 0, so sigmoid(Var / beta) >= 1/2. The shared
    prediction always keeps at least half the weight, and the personalized one never gets more
    than half, however certain it is (exactly half when all N_m samples agree).
    """
    mean = y_samples.mean(-1)                         # Eq. (16), Y*_mu
    variance = y_samples.var(-1, unbiased=False)      # Eq. (16), Y*_sigma (population variance)
    uncertainty = torch.sigmoid(variance / beta)
    y = y_shared * uncertainty + mean * (1 - uncertainty)   # Eq. (17)
    return y, uncertainty


# ------------------------------------------------------------------------------------------------
# Eq. (18), the loss, and the model: Algorithm 1
# ------------------------------------------------------------------------------------------------

def mlp(n_in, hidden, n_out):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


class SideFactors(nn.Module):
    """Our option (Config.factor_sources = "sides"): q_phi's second component with the sides kept
    apart. The user-side factors' mean and log-variance are a linear map of the history summary
    (which no target sees), the item-side ones a linear map of the target item's embedding."""

    def __init__(self, cfg):
        super().__init__()
        D, d, Nu = cfg.embed_dim, cfg.factor_dim, cfg.n_user_factors
        self.shape_u, self.shape_i = (2, Nu, d), (2, cfg.n_factors - Nu, d)
        self.user_fc = nn.Linear(D, 2 * Nu * d)
        self.item_fc = nn.Linear(D, 2 * (cfg.n_factors - Nu) * d)

    def forward(self, summary, target_emb):
        """summary [B, D]; target_emb [B, C, D] -> mean, logvar [B, C, N, d] (user factors first)."""
        B, C, _ = target_emb.shape
        user = self.user_fc(summary).unflatten(-1, self.shape_u)[:, None].expand(B, C, *self.shape_u)
        stats = torch.cat([user, self.item_fc(target_emb).unflatten(-1, self.shape_i)], -2)
        return stats[..., 0, :, :], stats[..., 1, :, :]


class AdditiveHeads(nn.Module):
    """Our option (Config.head_form = "additive"): a prediction head that is a sum over factors,
    logit = sum_k h_k([e_k ; e-hat_k]), the N one-hidden-layer MLPs h_k evaluated together."""

    def __init__(self, n_factors, factor_dim, hidden):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_factors, 2 * factor_dim, hidden) / math.sqrt(2 * factor_dim))
        self.b1 = nn.Parameter(torch.zeros(n_factors, hidden))
        self.w2 = nn.Parameter(torch.randn(n_factors, hidden) / math.sqrt(hidden * n_factors))
        self.b2 = nn.Parameter(torch.zeros(()))

    def forward(self, e, e_hat):
        """e, e_hat [..., N, d] -> logits [...]."""
        x = torch.cat([e, e_hat], -1)                                                  # [..., N, 2d]
        hidden = F.gelu(torch.einsum("...nk,nkh->...nh", x, self.w1) + self.b1)
        return torch.einsum("...nh,nh->...", hidden, self.w2) + self.b2


class PlanRec(nn.Module):
    """Algorithm 1: Theta = {phi (encoder), theta (decoder), A, vartheta (g), MLP_mask, MLP_R, MLP_R*}."""

    def __init__(self, cfg: Config, scm_fn=None, factor_mlps_fn=None):
        """scm_fn, factor_mlps_fn: the implementations of personalized_scm and of g to use (this
        file's by default, or kernels.personalized_scm and kernels.factor_mlps: same signatures).

        The order in which the parts are created below fixes the random stream of their
        initialization: reordering them changes every seeded run."""
        super().__init__()
        self.cfg = cfg
        D, N, d = cfg.embed_dim, cfg.n_factors, cfg.factor_dim
        self.item_emb = nn.Embedding(cfg.n_items + 1, D, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.encoder = PaperEncoder(cfg) if cfg.encoder == "paper" else TargetAttentionEncoder(cfg)
        self.context_len = context_length(cfg)
        # Decoder p_theta(u, i | z): reconstructs the user and item input representations.
        self.decoder = mlp(N * d, cfg.head_hidden, 2 * D)
        self.heads_read_e = cfg.predict_from == "both" and cfg.structure != "none"
        n_head_in = N * d * (2 if self.heads_read_e else 1)
        additive = cfg.head_form == "additive"        # our option (Config.head_form)
        head = (lambda: AdditiveHeads(N, d, cfg.head_hidden)) if additive else (lambda: mlp(n_head_in, cfg.head_hidden, 1))
        self.predict_shared = head()                                           # MLP_R
        if cfg.tied_attributes:
            self.attributes = AttributePredictors(cfg)
        if cfg.structure != "none":
            support = dependency_support(cfg)
            self.register_buffer("support", support.float(), persistent=False)
            # Our choice: A starts small and random (at exactly zero every A_i * e is zero, e-hat is
            # a constant, and no gradient reaches the encoder until A has grown). Blocked entries
            # start at zero and get no gradient (A is used through A * support), so they stay zero.
            self.dependency_matrix = nn.Parameter(0.1 * torch.randn(N, N) * support)
            self.g = FactorMLPs(N, d, cfg.g_hidden, factor_mlps_fn)
            # The masks can only keep allowed entries: K_A is clipped to how many there are.
            self.k_A = min(cfg.k_A, int(support.sum()))
        if cfg.structure == "personalized":
            self.user_emb = nn.Embedding(cfg.n_users, D)
            nn.init.normal_(self.user_emb.weight, std=0.1)
            self.predict_personal = head()                                     # MLP_R*
            self.mask_mlp = mlp(D, cfg.head_hidden, N * N + N)               # MLP_mask
        self.scm_fn = scm_fn or personalized_scm
        if cfg.factor_sources == "sides":           # our option, created last: the default's init is unchanged
            self.side_factors = SideFactors(cfg)

    def shared_A(self):
        """The A the model uses: zero diagonal (no factor causes itself), zero in dropped blocks."""
        return self.dependency_matrix * self.support

    def forward(self, user, history, items, seq=None, end=None, segment=None):
        """user [B]; history [Q, W] item ids (0 = padding, on the left); items [B, C] candidate
        item ids of the B rows. By default each history row is one row whose target follows its
        last item (Q = B: a row-wise call, as in evaluation). A sequence batch (training) gives
        seq, end [B]: row r's target follows history[seq[r], end[r] - 1], and optionally segment
        [Q, W], which user sequence each token belongs to where several lie end to end in a row
        (data.RecData.train_sequences). Our encoder reads context_length(cfg) items before a
        target: a row-wise call with that much history equals the sequence-batched one.

        Returns a dict with 'y' [B, C] (probability of interaction, Eq. (17)), 'uncertainty' [B, C]
        (where the personalized branch exists), and the per-candidate loss ingredients."""
        out = self.encode(history, items, seq, end, segment)                # Eq. (2)-(6)
        if self.cfg.structure != "none":
            out.update(self.shared_structure(out["z"]))                      # Eq. (7)-(8)
        e, e_hat = out.get("e", out["z"]), out.get("e_hat", out["z"])       # VAE base: predict from z
        out["y_shared"] = self.predict(self.predict_shared, e, e_hat)       # Eq. (15)
        if self.cfg.structure == "personalized":
            out.update(self.personalize_and_balance(user, out))            # Eq. (11)-(17)
        else:
            out["y"] = out["y_shared"]
        if self.cfg.tied_attributes:
            out["attribute_predictions"] = self.attributes(out["z"])        # section 2.3, with prior
        return out

    def encode(self, history, items, seq=None, end=None, segment=None):
        """Eq. (2)-(6): the posterior q_phi(z | u, i) and a sample z of it, with what the decoder
        must reconstruct (arguments as in forward).

        Eq. (2)-(3): p_theta(u, i) = integral of p_theta(u, i | z) p_theta(z) dz, and its posterior
        p_theta(z | u, i) is intractable, so the encoder q_phi(z | u, i) approximates it (Eq. (4))."""
        L = self.cfg.history_len
        rowwise = seq is None
        if rowwise:
            seq = torch.arange(history.shape[0], device=history.device)
            end = torch.full_like(seq, history.shape[1])
        target_emb = self.item_emb(items)
        if self.cfg.encoder == "paper":
            # each row's own window, encoded with each candidate: nothing is shared
            window, keep = history_windows(history, seq, end, segment, L)
            window_emb = self.item_emb(history.flatten()[window] * keep)                  # [B, L, D]
            mean, logvar, summary = self.encoder(window_emb, ~keep, target_emb)
            keep = keep.unsqueeze(-1).to(window_emb.dtype)
            user_input = (window_emb * keep).sum(1) / keep.sum(1).clamp(min=1)
        else:
            # Each sequence encoded once, in blocks of L (left-padded to whole blocks). Row b sits at
            # the slot of its last history item; its window is that item's band. Rows can take any
            # of the L slots of a block, or (row-wise) only the last slot of each history row's
            # last block: M = 1 slot per block, so that evaluation's 101 candidates per row do not
            # fill L slots per block.
            history, segment, pad = self._in_blocks(history, segment)
            Q, W = history.shape
            windows = band_windows(history, segment, L)                                  # [G, L, 2L]
            M = 1 if rowwise else L
            last = seq * W + end + pad - 1
            slot = torch.div(last, L, rounding_mode="floor") * M + last % L - (L - M)
            history_emb = self.item_emb(history)                                           # [Q, W, D]
            mean, logvar, summary = self.encoder(history_emb, band_bias(windows, history_emb.dtype),
                                                 windows[:, L - M:], slot, target_emb)
            user_input = window_mean(with_previous_block(history_emb.detach().view(Q, W // L, L, -1), 0.0),
                                     windows[:, L - M:], slot)
        if self.cfg.factor_sources == "sides":     # our option: no factor sees both sides (Config)
            mean, logvar = self.side_factors(summary, target_emb)
        # Reparameterized sample while training, the mode at inference (section 2.4).
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean   # [B, C, N, d]
        # What the decoder must reconstruct: the user (mean embedding of the row's window) and the
        # item. Detached so the embeddings cannot collapse to make reconstruction free (our choice).
        B, C = items.shape
        recon_target = torch.cat([user_input[:, None].expand(B, C, -1), target_emb], -1).detach()
        return {"mean": mean, "logvar": logvar, "z": z, "summary": summary, "recon_target": recon_target}

    def _in_blocks(self, history, segment):
        """history, segment [Q, W] left-padded to whole blocks of history_len (segment -1 there),
        and the padding added."""
        pad = -history.shape[1] % self.cfg.history_len
        return F.pad(history, (pad, 0)), None if segment is None else F.pad(segment, (pad, 0), value=-1), pad

    def encode_history(self, history, segment=None):
        """Our encoder's history half alone: history [Q, W] (segment as in forward) -> the encoding
        of every token [Q, W, D]. What a target reads of a token is this, layer by layer."""
        if self.cfg.encoder == "paper":
            raise ValueError("the paper's encoder has no history half of its own: its history sees the target")
        padded, segment, pad = self._in_blocks(history, segment)
        history_emb = self.item_emb(padded)
        bias = band_bias(band_windows(padded, segment, self.cfg.history_len), history_emb.dtype)
        return self.encoder.encode_history(history_emb, bias)[:, pad:]

    def shared_structure(self, z):
        """Eq. (7)-(8) with the shared A."""
        A = self.shared_A()
        # Eq. (7): e = (I - A^T)^-1 z
        e = scm(z, A)
        # Eq. (8): e-hat_i = g(A_i * e), A_i = the coefficients of every factor on factor i
        e_hat = self.g(A, e)
        return {"e": e, "e_hat": e_hat}

    def predict(self, head, e, e_hat):
        """Eq. (15): Y = MLP(e-hat), or MLP([e ; e-hat]) with predict_from='both'.

        Y^c and Y*^k are probabilities, not logits (our reading): with beta = 0.002, Eq. (17) only
        balances anything on the scale of a probability's variance (at most 1/4); logit variances
        would saturate sigmoid(Var / beta) at 1 and silence the personalized branch."""
        if self.cfg.head_form == "additive":       # our option: sum_k h_k([e_k ; e-hat_k]) (Config)
            return torch.sigmoid(head(e, e_hat))
        x = torch.cat([e.flatten(-2), e_hat.flatten(-2)], -1) if self.heads_read_e else e_hat.flatten(-2)
        return torch.sigmoid(head(x)).squeeze(-1)

    def mask_logits(self, user, summary):
        """Eq. (11): M-bar^(A), M-bar^(e) = MLP_mask(u), as logits (log M-bar of Eq. (12)).

        Which way the masks point, where the paper contradicts itself: section 2.5 calls each entry
        of M-bar "to what extent the user does not care" about a factor or dependency, and Fig. 4
        plots "masking probabilities"; but Eq. (12)-(14) keep the top-K entries of the sampled
        mask (they become 1) and multiply A and z by it, so a high score keeps an entry. We follow
        the equations, the only reading that computes: the logits are keep-scores, and the
        paper's masking probability of an entry is 1 - its keep probability (train.py --export)."""
        cfg, N = self.cfg, self.cfg.n_factors
        u = self.user_emb(user) + (summary if cfg.mask_input == "id+history" else 0.0)
        logits = self.mask_mlp(u)
        logits_A = logits[:, : N * N].unflatten(-1, (N, N))
        # blocked dependencies are never kept (the diagonal is handled by personalized_scm)
        logits_A = torch.where(self.support.bool() | torch.eye(N, dtype=torch.bool, device=u.device),
                               logits_A, torch.full_like(logits_A, NEVER_LOGIT))
        return logits_A, logits[:, N * N:]

    def personalize_and_balance(self, user, out):
        """Eq. (11)-(17): N_m personalized structures, their predictions, and the balance."""
        cfg = self.cfg
        z = out["z"].detach() if cfg.w_personal_rec else out["z"]   # our option (Config.w_personal_rec)
        B, C, N, d = z.shape
        logits_A, logits_e = self.mask_logits(user, out["summary"])                     # Eq. (11)
        A_fixed = self.shared_A().detach()   # the paper blocks gradients into A in Eq. (13)-(14)
        # Our choice: the N_m structures are sampled once per (user, history) and shared by all its
        # candidate items: a personalized structure belongs to the user, and candidates ranked
        # against each other under the same samples compare fairly. The C candidates' factors
        # become C*d right-hand-side columns of one solve per sample.
        z_columns = z.permute(0, 2, 1, 3).reshape(B, N, C * d)
        # Eq. (12)-(13): M^(A),k, M^(e),k ~ Gumbel top-K;  e*^k = (I - (M^(A),k * A)^T)^-1 (M^(e),k * z)
        if cfg.mask_form == "gates":     # our option (Config.mask_form): independent gates, no kernel of its own
            mask_A, mask_e = sample_gates(logits_A, logits_e, cfg.n_mask_samples, cfg.tau)
            e_star = masked_scm(z_columns, A_fixed, mask_A, mask_e)
        else:
            e_star, mask_A, mask_e = self.scm_fn(z_columns, A_fixed, logits_A, logits_e, cfg.n_mask_samples,
                                                 self.k_A, cfg.k_e, cfg.tau)
        e_star = e_star.unflatten(-1, (C, d)).transpose(2, 3)                            # [B, S, C, N, d]
        # Eq. (14): e-hat*_i = g((M^(A)_i * A_i) * (M^(e) * e*)). M^(e) scales parent j's whole
        # input, so it is folded into the coefficients: (M^(A) * A)[j, i] * M^(e)_j.
        coefficient = mask_A * A_fixed * mask_e[..., :, None]                            # [B, S, N, N]
        e_hat_star = self.g(coefficient[:, :, None], e_star)                             # [B, S, C, N, d]
        # Eq. (15): Y*^k = MLP_R*(e-hat*^k)
        y_samples = self.predict(self.predict_personal, e_star, e_hat_star)              # [B, S, C]
        # Eq. (16)-(17): Y = Y^c sigma(Var/beta) + mean(Y*) (1 - sigma(Var/beta))
        y, uncertainty = balance(out["y_shared"], y_samples.permute(0, 2, 1), cfg.beta)
        extra = {"y_personal": y_samples.mean(1)} if cfg.w_personal_rec else {}   # our option (Config)
        return {"y": y, "uncertainty": uncertainty, **extra, "mask_A": mask_A, "mask_e": mask_e,
                "mask_logits_A": logits_A, "mask_logits_e": logits_e, "e_star": e_star, "e_hat_star": e_hat_star}

    def loss(self, out, labels, attribute_targets=None):
        """Eq. (18): L = L_R - ELBO + L_struct + L_dag (+ the attribute losses of section 2.3 when
        attributes are tied), with each term returned for logging.

        labels [B, C] in {0, 1}; attribute_targets as AttributePredictors.loss takes them."""
        cfg = self.cfg
        terms = {}
        y = out["y"].clamp(1e-7, 1 - 1e-7)
        terms["recommend"] = F.binary_cross_entropy(y, labels.to(y.dtype))              # Eq. (1)
        # Eq. (5): log p(u, i) = KL(q || p(z | u, i)) + ELBO >= ELBO, so we minimize
        # -ELBO = reconstruction (cosine distance, section 2.3) + KL(q || N(0, b0^2 I)) (Eq. (6)).
        # RecR: the decoder reads e-hat (the structure is part of theta) instead of z.
        source = out["e_hat"] if (cfg.structure != "none" and cfg.reconstruction_reg) else out["z"]
        decoded = self.decoder(source.flatten(-2))
        D = cfg.embed_dim
        target = out["recon_target"]
        cos_u = F.cosine_similarity(decoded[..., :D], target[..., :D], dim=-1, eps=1e-6)
        cos_i = F.cosine_similarity(decoded[..., D:], target[..., D:], dim=-1, eps=1e-6)
        terms["reconstruct"] = ((1 - cos_u) + (1 - cos_i)).mean()
        mean, logvar, b0 = out["mean"], out["logvar"], cfg.prior_scale
        kl = 0.5 * ((mean.pow(2) + logvar.exp()) / b0**2 - 1 - logvar + 2 * math.log(b0))
        # Our choice: the KL and L_struct are averaged over the N*d latent coordinates rather than
        # summed, so that every term of Eq. (18) is on the scale of one binary cross-entropy and the
        # paper's unit weights do not let the regularizers drown the recommendation loss.
        terms["kl"] = kl.mean()
        total = cfg.w_recommend * terms["recommend"] + cfg.w_reconstruct * terms["reconstruct"] + cfg.w_kl * terms["kl"]
        if cfg.structure != "none":
            if cfg.dependency_reg:
                # Eq. (9): L_struct = ||e-hat - e||^2. As in the paper, e is not detached: the loss
                # pulls the factors toward what their parents predict as well as teaching A and g
                # to predict them (detaching e broke training on the synthetic world: test NDCG@10
                # 0.077, L_struct stuck above 1.5; tests pin the gradient that reaches z).
                terms["struct"] = (out["e_hat"] - out["e"]).pow(2).mean()
                total = total + cfg.w_struct * terms["struct"]
            if cfg.structure == "personalized" and cfg.w_personal_struct:
                # our option (Config.w_personal_struct): Eq. (9) for the N_m personalized structures
                terms["struct_personal"] = (out["e_hat_star"] - out["e_star"]).pow(2).mean()
                total = total + cfg.w_personal_struct * terms["struct_personal"]
            if cfg.dag_reg:
                alpha = cfg.dag_alpha or None
                terms["dag"] = dag_penalty(self.shared_A(), alpha)                         # Eq. (10)
                total = total + cfg.w_dag * terms["dag"]
        if cfg.structure == "personalized" and cfg.w_keep:
            # our option (Config.w_keep): a keep prior on every allowed entry of both masks, -log sigmoid(logit)
            allowed = self.support.bool()
            drop_cost = torch.cat([F.softplus(-out["mask_logits_A"][:, allowed]), F.softplus(-out["mask_logits_e"])], 1)
            terms["keep"] = drop_cost.mean()
            total = total + cfg.w_keep * terms["keep"]
        if cfg.structure == "personalized" and cfg.w_personal_rec:
            # our option (Config.w_personal_rec): the masks' own objective, Y*_mu on the user's own labels
            y_personal = out["y_personal"].clamp(1e-7, 1 - 1e-7)
            terms["recommend_personal"] = F.binary_cross_entropy(y_personal, labels.to(y_personal.dtype))
            total = total + cfg.w_personal_rec * terms["recommend_personal"]
        if cfg.tied_attributes:
            if attribute_targets is None:
                raise ValueError("this model ties factors to attributes: pass attribute_targets to loss()")
            terms["attribute"] = self.attributes.loss(out["attribute_predictions"], attribute_targets)
            total = total + cfg.w_attribute * terms["attribute"]
        terms["total"] = total
        return total, terms
