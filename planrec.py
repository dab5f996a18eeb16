"""PlanRec: Personalized Latent Structure Learning for Recommendation (Zhang et al., IEEE TPAMI).

The whole model in one file, in the order of the paper's section 2. Search "Eq. (n)" to find the
lines that compute equation n. Values the paper states are marked "paper"; everything the paper
leaves open is marked "our choice".

Shapes used throughout:
    B  (user, history) rows in a batch
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
    embed_dim: int = 16            # paper: 8; ours 16, measured better on ML-1M (RESULTS.md)
    history_len: int = 50          # paper: "the last 50 clicked items"
    n_layers: int = 2              # paper: "a two-layer self-attention network"
    n_heads: int = 1               # our choice (embeddings this narrow leave little to split)
    ffn_dim: int = 32              # our choice
    n_factors: int = 8             # N, our choice
    n_user_factors: int = 4        # N_u, our choice: names factors 0..N_u-1 user-side for analysis; the model treats all alike
    factor_dim: int = 8            # d, our choice
    g_hidden: int = 16             # hidden width of each factor's g_vartheta MLP, our choice
    head_hidden: int = 32          # hidden width of MLP_R, MLP_R*, MLP_mask and the decoder, our choice
    tau: float = 1.0               # paper: Gumbel-softmax temperature
    beta: float = 0.002            # paper: uncertainty normalization in Eq. (17)
    n_mask_samples: int = 8        # N_m, paper: 8 on MovieLens (Table 3)
    k_A: int = 28                  # top-K of the dependency mask: half of the N(N-1) off-diagonal entries, our choice
    k_e: int = 6                   # top-K of the factor mask: 6 of 8 factors kept, our choice
    prior_scale: float = 1.0       # b0 of the prior N(0, b0^2 I), our choice
    dag_alpha: float = 0.0         # alpha of Eq. (10); 0 means 1/N, our choice
    # Loss weights of Eq. (18). The paper weighs every term 1; ours weigh the regularizers 0.1,
    # measured better on ML-1M (RESULTS.md): at 1 the KL and L_struct slow the ranking loss down.
    w_recommend: float = 1.0
    w_reconstruct: float = 0.1
    w_kl: float = 0.1
    w_struct: float = 0.1
    w_dag: float = 0.1
    # Ablation switches (paper Tables 7 and 8). structure: 'none' is the VAE base, 'shared' is
    # +SSL, 'personalized' is +PSL (with n_mask_samples=1) or the full model (n_mask_samples>1).
    structure: str = "personalized"
    # What MLP_R and MLP_R* read: "e_hat" is Eq. (15) as written; "both" also gives them the
    # endogenous factors e (e* for MLP_R*) that e-hat was computed from. Our choice, see README.
    predict_from: str = "both"
    reconstruction_reg: bool = True   # RecR: reconstruct (u, i) from e-hat instead of z
    dag_reg: bool = True              # AcyR: Eq. (10)
    dependency_reg: bool = True       # DepR: Eq. (9)

    def __post_init__(self):
        if self.structure not in ("none", "shared", "personalized"):
            raise ValueError(f"structure must be 'none', 'shared' or 'personalized', got {self.structure!r}")
        if self.predict_from not in ("e_hat", "both"):
            raise ValueError(f"predict_from must be 'e_hat' or 'both', got {self.predict_from!r}")
        if not 0 < self.n_user_factors < self.n_factors:
            raise ValueError(f"n_user_factors must be in 1..n_factors-1, got {self.n_user_factors}")
        if not 1 <= self.k_A <= self.n_factors * (self.n_factors - 1):
            raise ValueError(f"k_A must be in 1..N(N-1)={self.n_factors * (self.n_factors - 1)}, got {self.k_A}")
        if not 1 <= self.k_e <= self.n_factors:
            raise ValueError(f"k_e must be in 1..N={self.n_factors}, got {self.k_e}")
        if self.n_mask_samples < 1 or self.tau <= 0 or self.beta <= 0:
            raise ValueError(f"need n_mask_samples >= 1, tau > 0 and beta > 0; got {self.n_mask_samples}, {self.tau}, {self.beta}")
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by n_heads {self.n_heads}")

    def to_dict(self):
        return asdict(self)


# Where our defaults above depart from what the paper states, the paper's values
# (train.py --paper-settings applies them, with the paper's Adagrad optimizer).
PAPER_SETTINGS = dict(embed_dim=8, predict_from="e_hat", w_reconstruct=1.0, w_kl=1.0, w_struct=1.0, w_dag=1.0)


# ------------------------------------------------------------------------------------------------
# The public functions (the Triton kernel in kernels/ matches personalized_scm exactly)
# ------------------------------------------------------------------------------------------------

def dag_penalty(A, alpha=None):
    """Eq. (10): L_dag = tr((I + alpha A*A)^N) - N; zero exactly when A is acyclic (NOTEARS-style, [17]).

    alpha defaults to 1/N (our choice: keeps the spectral radius of I + alpha A*A moderate for
    entries of order 1)."""
    n = A.shape[-1]
    alpha = 1.0 / n if alpha is None else alpha
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    M = torch.linalg.matrix_power(eye + alpha * A * A, n)
    return torch.diagonal(M, dim1=-2, dim2=-1).sum(-1) - n


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
    # top-K of the perturbed logits = top-K of the soft probabilities, for any tau > 0
    index = perturbed.topk(k, dim=-1).indices
    hard = torch.zeros_like(perturbed).scatter_(-1, index, 1.0)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return hard                      # inference: the softmax only matters for the gradient
    soft = torch.softmax(perturbed / tau, dim=-1)
    return hard + (soft - soft.detach())   # parenthesized: the forward stays exactly 0/1


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
    eye = torch.eye(N, dtype=torch.bool, device=z.device)
    # The mask lives on off-diagonal entries only: a -inf logit is never picked and has zero probability.
    logits_A = logits_A.masked_fill(eye, float("-inf"))
    logits_A = logits_A[:, None].expand(B, n_samples, N, N).reshape(B, n_samples, N * N)
    logits_e = logits_e[:, None].expand(B, n_samples, N)
    if uniform_A is not None:
        uniform_A = uniform_A.reshape(B, n_samples, N * N)
    mask_A = gumbel_topk(logits_A, k_A, tau, uniform_A).reshape(B, n_samples, N, N)   # Eq. (12)
    mask_e = gumbel_topk(logits_e, k_e, tau, uniform_e)                                 # Eq. (12)
    # Eq. (13): e* = (I - (M_A * A)^T)^-1 (M_e * z). The masked graph need not be acyclic while
    # training, so this is a general solve, not a triangular one.
    system = torch.eye(N, dtype=z.dtype, device=z.device) - (mask_A * A).transpose(-1, -2)
    e_star = torch.linalg.solve(system, mask_e[..., None] * z[:, None])
    return e_star, mask_A, mask_e


def balance(y_shared, y_samples, beta):
    """Eq. (16)-(17): mix the shared prediction and the mean personalized one by the uncertainty.

    y_samples holds the N_m samples in its last dimension. Returns (y, uncertainty) with
    uncertainty = sigmoid(Var / beta), the weight of the shared prediction.
    """
    mean = y_samples.mean(-1)                         # Eq. (16), Y*_mu
    variance = y_samples.var(-1, unbiased=False)      # Eq. (16), Y*_sigma (population variance)
    uncertainty = torch.sigmoid(variance / beta)
    y = y_shared * uncertainty + mean * (1 - uncertainty)   # Eq. (17)
    return y, uncertainty


# ------------------------------------------------------------------------------------------------
# Section 2.3: the encoder q_phi(z | u, i) (Eq. 2-6, "Implementation Details")
# ------------------------------------------------------------------------------------------------

class TargetAttentionLayer(nn.Module):
    """One pre-norm self-attention block over [history ; target].

    Our choice for speed (the paper only says "two-layer self-attention over the behaviour
    sequence and the target item"): history tokens attend to history tokens only, and the target
    token attends to history and itself. The history half then does not depend on the target, so
    it is computed once per history and shared by the positive, its negatives and all 101
    evaluation candidates. The target token still attends to every history token and to itself
    at every layer; only the history tokens no longer see the target.
    """

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

    def forward(self, history, target, history_keep):
        """history [B, L, D]; target [B, C, D] (C candidates share one history); history_keep [B, L]
        is False at padding. Every history has at least one real item."""
        qh, kh, vh = map(self._heads, self.qkv(self.norm_attn(history)).chunk(3, -1))   # [B, H, L, D/H]
        qt, kt, vt = map(self._heads, self.qkv(self.norm_attn(target)).chunk(3, -1))    # [B, H, C, D/H]
        scale = 1.0 / math.sqrt(qh.shape[-1])
        # history -> history (fused attention; padding keys masked)
        h = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=history_keep[:, None, None, :])
        h = h.transpose(-2, -3).flatten(-2)
        # target -> [history ; itself]
        att_h = (qt @ kh.transpose(-1, -2) * scale).masked_fill(~history_keep[:, None, None, :], float("-inf"))
        att_t = (qt * kt).sum(-1, keepdim=True) * scale                                  # [B, H, C, 1]
        w = torch.cat([att_h, att_t], -1).softmax(-1)
        t = (w[..., :-1] @ vh + w[..., -1:] * vt).transpose(-2, -3).flatten(-2)
        history = history + self.out(h)
        target = target + self.out(t)
        history = history + self.ffn(self.norm_ffn(history))
        target = target + self.ffn(self.norm_ffn(target))
        return history, target


class Encoder(nn.Module):
    """q_phi(z | u, i): self-attention over [history ; target], then an FC layer reshaped to N factors."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.embed_dim
        self.position = nn.Parameter(torch.zeros(cfg.history_len + 1, D))
        self.layers = nn.ModuleList(TargetAttentionLayer(D, cfg.n_heads, cfg.ffn_dim) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(D)
        # Our choice: the FC layer reads the target token's output and an FM-style product of the
        # history summary with the target embedding, so a dot-product preference (the strongest
        # signal in next-item data) is linear in its input. The paper allows "any neural
        # architecture that evolves interactions of the user and the target item" here.
        self.to_factors = nn.Linear(2 * D, 2 * cfg.n_factors * cfg.factor_dim)   # mean and log-variance
        self.n_factors, self.factor_dim = cfg.n_factors, cfg.factor_dim

    def forward(self, history_emb, history_pad, target_emb):
        """history_emb [B, L, D]; history_pad [B, L] (True = padding); target_emb [B, C, D].

        Returns mean, logvar [B, C, N, d] and a target-independent user summary [B, D]."""
        L = history_emb.shape[1]
        h = history_emb + self.position[:L]
        t = target_emb + self.position[L]
        history_keep = ~history_pad
        for layer in self.layers:
            h, t = layer(h, t, history_keep)
        keep = history_keep.unsqueeze(-1).to(h.dtype)
        summary = (self.norm(h) * keep).sum(1) / keep.sum(1).clamp(min=1)
        features = torch.cat([self.norm(t), summary[:, None, :] * target_emb], -1)
        stats = self.to_factors(features).unflatten(-1, (2, self.n_factors, self.factor_dim))
        return stats[..., 0, :, :], stats[..., 1, :, :], summary


# ------------------------------------------------------------------------------------------------
# Section 2.4: shared structure learning (Eq. 7-10)
# ------------------------------------------------------------------------------------------------

class FactorMLPs(nn.Module):
    """g_vartheta of Eq. (8) and (14): one small MLP per factor, all N evaluated in one batched matmul.

    Factor i's MLP reads its parent-masked factors (coefficient[j, i] * e_j for every j, N x d
    numbers) and returns d numbers."""

    def __init__(self, n_factors, factor_dim, hidden):
        super().__init__()
        n_in = n_factors * factor_dim
        self.w1 = nn.Parameter(torch.randn(n_factors, n_in, hidden) / math.sqrt(n_in))
        self.b1 = nn.Parameter(torch.zeros(n_factors, 1, hidden))
        self.w2 = nn.Parameter(torch.randn(n_factors, hidden, factor_dim) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(n_factors, 1, factor_dim))

    def forward(self, coefficient, e):
        """coefficient [..., N(parent), N(child)] (A, or a masked A); e [..., N, d] -> e-hat [..., N, d]."""
        N, d = e.shape[-2:]
        batch = torch.broadcast_shapes(coefficient.shape[:-2], e.shape[:-2])
        # Built child-first, [N(child), ..., N(parent), d], so both layers are plain batched matmuls.
        parents = coefficient.expand(*batch, N, N).movedim(-1, 0)[..., None] * e[None]
        x = parents.reshape(N, -1, N * d)
        h = F.gelu(torch.baddbmm(self.b1, x, self.w1))
        out = torch.baddbmm(self.b2, h, self.w2)                     # [N, M, d]
        return out.reshape(N, *batch, d).movedim(0, -2)


def scm(z, A):
    """Eq. (7): e = (I - A^T)^-1 z, for z [..., N, d] and one shared A [N, N]."""
    N = A.shape[0]
    inverse = torch.linalg.inv(torch.eye(N, dtype=A.dtype, device=A.device) - A.T)
    return torch.einsum("ij,...jd->...id", inverse, z)


def mlp(n_in, hidden, n_out):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


# ------------------------------------------------------------------------------------------------
# The model: Algorithm 1
# ------------------------------------------------------------------------------------------------

class PlanRec(nn.Module):
    def __init__(self, cfg: Config, scm_fn=None):
        """scm_fn: the implementation of personalized_scm to use (this file's eager one by default,
        or kernels.personalized_scm); both share one signature."""
        super().__init__()
        self.cfg = cfg
        D, N, d = cfg.embed_dim, cfg.n_factors, cfg.factor_dim
        self.item_emb = nn.Embedding(cfg.n_items + 1, D, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.encoder = Encoder(cfg)
        # Decoder p_theta(u, i | z): reconstructs the user and item input representations.
        self.decoder = mlp(N * d, cfg.head_hidden, 2 * D)
        n_head_in = N * d * (2 if cfg.predict_from == "both" and cfg.structure != "none" else 1)
        self.predict_shared = mlp(n_head_in, cfg.head_hidden, 1)              # MLP_R
        if cfg.structure != "none":
            # Our choice: A starts small and random. At exactly zero every A_i * e is zero, e-hat is a
            # constant, and no gradient reaches the encoder until A has grown.
            self.dependency_matrix = nn.Parameter(0.1 * torch.randn(N, N))
            self.g = FactorMLPs(N, d, cfg.g_hidden)
        if cfg.structure == "personalized":
            self.user_emb = nn.Embedding(cfg.n_users, D)
            nn.init.normal_(self.user_emb.weight, std=0.1)
            self.predict_personal = mlp(n_head_in, cfg.head_hidden, 1)        # MLP_R*
            self.mask_mlp = mlp(D, cfg.head_hidden, N * N + N)               # MLP_mask
        self.scm_fn = scm_fn or personalized_scm

    def offdiagonal_A(self):
        A = self.dependency_matrix
        return A - torch.diag_embed(torch.diagonal(A))   # zero diagonal: no factor causes itself

    def _head_input(self, e, e_hat):
        if self.cfg.predict_from == "both" and self.cfg.structure != "none":
            return torch.cat([e.flatten(-2), e_hat.flatten(-2)], -1)
        return e_hat.flatten(-2)

    def forward(self, user, history, items):
        """user [B]; history [B, L] item ids (0 = padding); items [B, C] candidate item ids.

        Returns a dict with 'y' [B, C] (probability of interaction, Eq. 17), 'uncertainty' [B, C]
        (where the personalized branch exists), and the per-candidate loss ingredients."""
        cfg = self.cfg
        B, C = items.shape
        N, d = cfg.n_factors, cfg.factor_dim
        history_pad = history == 0
        history_emb = self.item_emb(history)
        target_emb = self.item_emb(items)
        mean, logvar, summary = self.encoder(history_emb, history_pad, target_emb)
        # Reparameterized sample while training, the mode at inference (Section 2.4).
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean   # [B, C, N, d]
        out = {"mean": mean, "logvar": logvar, "z": z}

        if cfg.structure == "none":          # VAE base: predict from z directly
            e = e_hat = z
        else:
            A = self.offdiagonal_A()
            e = scm(z, A)                                                   # Eq. (7)
            e_hat = self.g(A, e)                                            # Eq. (8): A_i * e for each i
            out["e"], out["e_hat"] = e, e_hat
        # Y^c and Y*^k are probabilities, not logits (our reading): with beta = 0.002, Eq. (17)
        # only balances anything on the scale of a probability's variance (at most 1/4); logit
        # variances would saturate sigmoid(Var / beta) at 1 and silence the personalized branch.
        y_shared = torch.sigmoid(self.predict_shared(self._head_input(e, e_hat))).squeeze(-1)  # Eq. (15), Y^c [B, C]

        if cfg.structure == "personalized":
            user_vec = self.user_emb(user) + summary                        # u in Eq. (11), our choice
            logits = self.mask_mlp(user_vec)                                 # Eq. (11)
            logits_A, logits_e = logits[:, : N * N].reshape(B, N, N), logits[:, N * N:]
            A_fixed = A.detach()   # the paper blocks gradients into A in Eq. (13)-(14)
            # Our choice: the N_m structures are sampled once per (user, history) and shared by all
            # its candidate items: a personalized structure belongs to the user, and candidates
            # ranked against each other under the same samples compare fairly. The C candidates'
            # factors become C*d right-hand-side columns of one solve per sample.
            z_columns = z.permute(0, 2, 1, 3).reshape(B, N, C * d)
            e_star, mask_A, mask_e = self.scm_fn(z_columns, A_fixed, logits_A, logits_e, cfg.n_mask_samples,
                                                 cfg.k_A, cfg.k_e, cfg.tau)              # Eq. (12)-(13)
            e_star = e_star.reshape(B, -1, N, C, d).transpose(2, 3)                      # [B, S, C, N, d]
            e_hat_star = self.g((mask_A * A_fixed)[:, :, None],
                                mask_e[:, :, None, :, None] * e_star)                    # Eq. (14)
            y_samples = torch.sigmoid(self.predict_personal(self._head_input(e_star, e_hat_star))).squeeze(-1)  # Eq. (15)
            y, uncertainty = balance(y_shared, y_samples.permute(0, 2, 1), cfg.beta)     # Eq. (16)-(17)
            out["y"], out["uncertainty"], out["mask_A"], out["mask_e"] = y, uncertainty, mask_A, mask_e
        else:
            out["y"] = y_shared
        # What the decoder must reconstruct: the user (mean history embedding) and the item.
        # Detached so the embeddings cannot collapse to make reconstruction free (our choice).
        keep = (~history_pad).unsqueeze(-1).to(history_emb.dtype)
        user_input = (history_emb * keep).sum(1) / keep.sum(1).clamp(min=1)
        out["recon_target"] = torch.cat([user_input[:, None].expand(B, C, -1), target_emb], -1).detach()
        out["recon_source"] = e_hat if (cfg.structure != "none" and cfg.reconstruction_reg) else z   # [B, C, N, d]
        return out

    def loss(self, out, labels):
        """Eq. (18): L = L_R - ELBO + L_struct + L_dag, with each term returned for logging.

        labels [B, C] in {0, 1}."""
        cfg = self.cfg
        terms = {}
        y = out["y"].clamp(1e-7, 1 - 1e-7)
        terms["recommend"] = F.binary_cross_entropy(y, labels.to(y.dtype))              # Eq. (1)
        # -ELBO = reconstruction (cosine distance, Section 2.3) + KL(q || N(0, b0^2 I)) (Eq. 6)
        decoded = self.decoder(out["recon_source"].flatten(-2))
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
                # Our choice: e is detached, so Eq. (9) teaches A and g to reproduce each factor
                # from its parents without pulling the factors themselves toward what their
                # parents predict (a root factor's e-hat is a constant, so that pull would
                # collapse z).
                terms["struct"] = (out["e_hat"] - out["e"]).pow(2).mean()   # Eq. (9)
                total = total + cfg.w_struct * terms["struct"]
            if cfg.dag_reg:
                alpha = cfg.dag_alpha or None
                terms["dag"] = dag_penalty(self.offdiagonal_A(), alpha)                    # Eq. (10)
                total = total + cfg.w_dag * terms["dag"]
        terms["total"] = total
        return total, terms
