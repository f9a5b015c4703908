"""EAGLE-style draft heads: a small decoder over the target's own features that drafts with the target's LM head.

The head reads the residual stream after three of the target's blocks (low, middle, high), fuses them into
one feature per position, combines it with the embedding of the next token, runs it through its own decoder
layer(s) and predicts with the target's (frozen, shared) LM head. At position t it has the target's
feature of t and the token t+1, and predicts token t+2: the target's distribution at t+1.

Training-time test (EAGLE-3): drafting past the first token, the head's input feature is its own output of
the previous position, not the target's. Training unrolls that: step j at position p reads the head's step
j-1 output at p-1 and attends to the target-fed keys of positions <= p-j and to its own chain, step i's
key at p-j+i for 1 <= i <= j (`ttt_mask`). Each step's target is the target's distribution at p+1, so one
forward of the target trains every step. What step j computes at p is what drafting j+1 tokens ahead of
position p-j computes (tests/unit/test_draft_head.py checks it against a plain causal run of the chain).

Legend: B batch, S positions, D model dim, V vocabulary, K keys.
"""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.config import DraftHeadConfig, ModelConfig
from expertmesh.distill.losses import divergence
from expertmesh.layers.mlp import SwiGLU
from expertmesh.models.transformer import apply_rope, rope_tables


def ttt_mask(S: int, step: int, device=None) -> torch.Tensor:
    """[S, (step + 1) S] boolean: which keys step `step`'s query at position p attends to, the keys of steps
    0..step laid side by side (step 0: the target-fed keys, causal up to p - step; step i >= 1: only p-step+i)."""
    p = torch.arange(S, device=device)[:, None]
    s = torch.arange(S, device=device)[None, :]
    return torch.cat([s <= p - step, *[s == p - step + i for i in range(1, step + 1)]], dim=1)


class HeadLayer(nn.Module):
    """A pre-norm decoder layer (grouped-query attention with RoPE, SwiGLU) whose attention takes the keys
    of earlier passes (`past`, appended to) and an explicit mask."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv = m.n_heads, m.n_kv_heads or m.n_heads
        self.head_dim = m.dim // m.n_heads
        self.attention_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.wq = nn.Linear(m.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(m.dim, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(m.dim, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, m.dim, bias=False)
        self.ffn_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.ffn = SwiGLU(m.dim, m.ffn_dim)
        self.rope_style = m.rope_style

    def forward(self, x_BSD: torch.Tensor, cos_SH, sin_SH, past: list, mask_SK: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        h = self.attention_norm(x_BSD)
        q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in (self.wq(h), self.wk(h), self.wv(h)))
        q, k = apply_rope(q, cos_SH, sin_SH, self.rope_style), apply_rope(k, cos_SH, sin_SH, self.rope_style)
        past.append((k, v))
        keys, values = torch.cat([pk for pk, _ in past], 2), torch.cat([pv for _, pv in past], 2)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask_SK, enable_gqa=self.n_kv != self.n_heads)
        x_BSD = x_BSD + self.wo(o.transpose(1, 2).reshape(B, S, -1))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class DraftHead(nn.Module):
    """The head's own weights; the target's embedding and LM head are handed in, never owned."""

    def __init__(self, m: ModelConfig, h: DraftHeadConfig) -> None:
        super().__init__()
        D = m.dim
        self.fuse = nn.Linear(3 * D, D, bias=False)  # low, middle, high features -> one
        self.norm_emb = nn.RMSNorm(D, eps=m.norm_eps)
        self.norm_feat = nn.RMSNorm(D, eps=m.norm_eps)
        self.fc_in = nn.Linear(2 * D, D, bias=False)  # [next token's embedding | feature] -> the layer's input
        self.layers = nn.ModuleList(HeadLayer(m) for _ in range(h.decoder_layers))
        self.norm = nn.RMSNorm(D, eps=m.norm_eps)
        cos, sin = rope_tables(m, D // m.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def inputs(self, feature_BSD: torch.Tensor, emb_BSD: torch.Tensor) -> torch.Tensor:
        return self.fc_in(torch.cat([self.norm_emb(emb_BSD), self.norm_feat(feature_BSD)], -1))

    def logits(self, out_BSD: torch.Tensor, lm_head_VD: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(out_BSD), lm_head_VD)

    def unrolled(self, feats: list[torch.Tensor], emb_next_BSD: torch.Tensor, lm_head_VD: torch.Tensor,
                 steps: int) -> list[torch.Tensor]:
        """Training-time test: logits [B, S, V] of steps 0..steps-1. `feats`: the target's three features at
        positions 0..S-1; `emb_next_BSD`: the embedding of the token after each position."""
        S = emb_next_BSD.shape[1]
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        feature = self.fuse(torch.cat([f.to(self.fuse.weight.dtype) for f in feats], -1))
        emb = emb_next_BSD.to(self.fuse.weight.dtype)
        past: list[list] = [[] for _ in self.layers]
        out = []
        for j in range(steps):
            mask = ttt_mask(S, j, emb.device)
            x = self.inputs(feature, emb)
            for layer, kv in zip(self.layers, past, strict=True):
                x = layer(x, cos, sin, kv, mask)
            out.append(self.logits(x, lm_head_VD))
            feature = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)  # position p reads p-1's output
        return out


def ttt_loss(head: DraftHead, feats: list[torch.Tensor], emb_BSD: torch.Tensor, target_logits_BSV: torch.Tensor,
             lm_head_VD: torch.Tensor, h: DraftHeadConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's loss over one forward of the target: `feats` and `emb_BSD` (the target's embedding output)
    at positions 0..S-1, the target's logits at the same positions. Step j is trained at positions
    j..S-2 against the target's distribution one position on. Returns the loss (the steps weighed by
    `step_decay ** j`) and, per step, the mean divergence and the top-1 agreement with the target (detached)."""
    return ttt_loss_p(head, feats, emb_BSD, target_logits_BSV.detach().float().softmax(-1), lm_head_VD,
                      h.ttt_steps, h.step_decay, h.divergence)


def ttt_loss_p(head: DraftHead, feats: list[torch.Tensor], emb_BSD: torch.Tensor, p_BSV: torch.Tensor,
               lm_head_VD: torch.Tensor, steps: int, step_decay: float, kind: str, beta: float = 0.5,
               valid_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ttt_loss` against the target's probabilities `p_BSV` (e.g. top-k kept by a verification pass), with
    `valid_BS` marking the positions that exist in right-padded rows (padding only ever follows a row's
    positions, so causal attention keeps it out of theirs)."""
    p = p_BSV[:, 1:].detach().float()
    top = p.argmax(-1)
    valid = torch.ones(p.shape[:2], device=p.device) if valid_BS is None else valid_BS[:, 1:].float()
    outs = head.unrolled([f[:, :-1] for f in feats], emb_BSD[:, 1:], lm_head_VD, steps)
    losses, agree = [], []
    for j, logits in enumerate(outs):
        w = valid[:, j:].flatten()
        per = divergence(kind, logits[:, j:].flatten(0, 1), p[:, j:].flatten(0, 1), beta=beta, reduction="none")
        losses.append((per * w).sum() / w.sum().clamp_min(1))
        agree.append(((logits[:, j:].argmax(-1) == top[:, j:]).float().flatten() * w).sum() / w.sum().clamp_min(1))
    weights = [step_decay**j for j in range(len(losses))]
    loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)
    return loss, torch.stack(losses).detach(), torch.stack(agree).detach()


def _layers(head: DraftHead, x_BSD: torch.Tensor, cos_SH, sin_SH, mask_SK: torch.Tensor, pasts: list[list]):
    """The head's layers in decoding: each attends to its earlier keys (`pasts`: per layer, (K, V) tensors or
    None, in order) and its own. Returns the output and each layer's new (K, V)."""
    new = []
    for layer, past in zip(head.layers, pasts, strict=True):
        past = [kv for kv in past if kv is not None]
        x_BSD = layer(x_BSD, cos_SH, sin_SH, past, mask_SK)
        new.append(past[-1])
    return x_BSD, new


def _joined(old: tuple | None, new: tuple) -> tuple:
    return new if old is None else (torch.cat([old[0], new[0]], 2), torch.cat([old[1], new[1]], 2))


def _decode(head: DraftHead, x_BSD: torch.Tensor, start: int, cache: list) -> tuple[torch.Tensor, list]:
    """Positions start..start+S-1 after the cached ones, causally; returns the output and the longer cache."""
    S = x_BSD.shape[1]
    mask = torch.ones(S, start + S, dtype=torch.bool, device=x_BSD.device).tril(start)
    x_BSD, new = _layers(head, x_BSD, head.rope_cos[start:start + S], head.rope_sin[start:start + S], mask,
                         [[kv] for kv in cache])
    return x_BSD, [_joined(kv, n) for kv, n in zip(cache, new, strict=True)]


class Tree:
    """A tree of drafts, slots in level order, slot 0 the root (the newest accepted token, which the target has
    not seen yet). `Tree(branch)`: the static tree with `branch[d]` children for every node at depth d (a chain:
    all ones); `Tree.from_parents(parent)`: any shape."""

    def __init__(self, branch: list[int]) -> None:
        if not branch or any(b < 1 for b in branch):
            raise ValueError(f"a tree needs one or more depths of >= 1 children each, got {branch}")
        parent, level = [-1], [0]
        for b in branch:
            nxt = []
            for node in level:
                nxt += range(len(parent), len(parent) + b)
                parent += [node] * b
            level = nxt
        self._build(parent)

    @classmethod
    def from_parents(cls, parent: list[int]) -> Tree:
        """A tree of any shape: `parent[s]` for each slot s >= 1 (a parent before its children), slot 0 the root."""
        if parent[0] != -1 or any(not 0 <= parent[s] < s for s in range(1, len(parent))):
            raise ValueError(f"parents {parent} must start with the root (-1) and precede their children")
        tree = cls.__new__(cls)
        tree._build(parent)
        return tree

    def _build(self, parent: list[int]) -> None:
        n = len(parent)
        self.parent, self.depth, self.children = list(parent), [0] * n, [[] for _ in range(n)]
        for slot in range(1, n):
            self.depth[slot] = self.depth[parent[slot]] + 1
            self.children[parent[slot]].append(slot)
        self.levels = [[s for s in range(n) if self.depth[s] == d] for d in range(1, max(self.depth) + 1)]
        self.ancestors = torch.zeros(n, n, dtype=torch.bool)  # [slot, slot]: ancestor or itself
        for slot in range(n):
            a = slot
            while a >= 0:
                self.ancestors[slot, a] = True
                a = self.parent[a]

    @property
    def size(self) -> int:
        """Drafted tokens (the nodes below the root)."""
        return len(self.parent) - 1


def verify_tree(p_BNV: torch.Tensor, q_BNV: torch.Tensor, tokens_BN: torch.Tensor, tree: Tree, greedy: bool,
                generator: torch.Generator | None = None) -> list[tuple[list[int], int]]:
    """Per request: the accepted path (slots, from the root down) and the token after it. `p_BNV`: the target's
    distribution after each slot; `q_BNV`: the draft's distribution each slot's children were drawn from.
    Greedy: follow the child that is the target's argmax. Sampling (the children of a node drawn i.i.d. from
    its q): try them in turn, each accepted with probability min(1, p(x) / q(x)), p replaced by
    norm(max(0, p - q)) after each rejection; the token after the path is drawn from the last p. Every
    emitted token is then distributed as the target's (SpecInfer's multi-draft rule; a chain is the usual
    speculative sampling)."""
    out = []
    for b in range(tokens_BN.shape[0]):
        slot, path = 0, []
        while True:
            p = p_BNV[b, slot].double()
            kids = tree.children[slot]
            if greedy:
                best = int(p.argmax())
                match = [c for c in kids if int(tokens_BN[b, c]) == best]
                if not match:
                    out.append((path, best))
                    break
                slot = match[0]
                path.append(slot)
                continue
            q = q_BNV[b, slot].double()
            taken = None
            for c in kids:
                x = int(tokens_BN[b, c])
                u = torch.rand((), dtype=torch.float64, generator=generator, device=p.device)
                if u * q[x] < p[x]:
                    taken = c
                    break
                residual = (p - q).clamp_min(0.0)
                if residual.sum() > 0:
                    p = residual / residual.sum()
            if taken is None:
                out.append((path, int(torch.multinomial(p, 1, generator=generator))))
                break
            slot = taken
            path.append(slot)
    return out


class Acceptance:
    """A head's probabilities made into greedy acceptance, learned from the verifications (a dynamic tree's values).
    EAGLE-2 takes a node's probability under the head as the chance it is accepted once its parent is; a head
    distilled on the target's whole distribution says how likely the target is to emit a token, while greedy
    decoding accepts it when it is the target's argmax: a head surer than it says (benchmarks/README.md#draft_head:
    top tokens accepted 0.905 of the times tested) ranks a chain's far nodes below near siblings that are rarely
    accepted. Here the chance is
    counted: every node whose parent the target accepted was tested, and accepted or not; the tests are binned by
    the node's rank among its parent's tokens under the head (1, 2, >= `ranks`) and its probability (`EDGES`), and
    a node's acceptance is (accepted + prior * q) / (tested + prior) of its bin (the head's own q while a bin is
    empty). Counts decay by `decay` a round, so the values follow a head that is still being distilled."""

    EDGES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # bins' upper edges, the last bin up to 1

    def __init__(self, ranks: int = 3, prior: float = 2.0, decay: float = 0.999) -> None:
        if ranks < 1 or prior <= 0 or not 0.0 < decay <= 1.0:
            raise ValueError(f"acceptance needs ranks={ranks} >= 1, prior={prior} > 0 and decay={decay} in (0, 1]")
        self.ranks, self.prior, self.decay = ranks, prior, decay
        self._edges = torch.tensor(self.EDGES, dtype=torch.float64)
        self.tested = torch.zeros(ranks, len(self.EDGES) + 1, dtype=torch.float64)
        self.accepted = torch.zeros_like(self.tested)

    def _bins(self, q: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        edges = self._edges.to(q.device, q.dtype)
        return (rank.clamp(1, self.ranks) - 1).cpu(), torch.bucketize(q.contiguous(), edges, right=True).cpu()

    def __call__(self, q: torch.Tensor, rank: torch.Tensor | int) -> torch.Tensor:
        """The chance that tokens of probability `q` under the head, at `rank` among their parent's, are accepted
        when their parent is (values in [0, 1]: a path's product only falls along it)."""
        rank = torch.as_tensor(rank, device=q.device).expand(q.shape)
        r, b = self._bins(q, rank)
        acc, n = self.accepted[r, b].to(q.device), self.tested[r, b].to(q.device)
        return (acc + self.prior * q.double()) / (n + self.prior)

    def observe(self, q: torch.Tensor, rank: torch.Tensor, accepted: torch.Tensor) -> None:
        """One round's tested nodes: their q, rank and whether the target accepted them (flat tensors)."""
        self.tested *= self.decay
        self.accepted *= self.decay
        r, b = self._bins(q, rank)
        self.tested.index_put_((r, b), torch.ones_like(r, dtype=torch.float64), accumulate=True)
        self.accepted.index_put_((r, b), accepted.double().cpu(), accumulate=True)

    def observe_round(self, shape: Tree, tokens_BN: torch.Tensor, q_BNV: torch.Tensor,
                      paths: list[list[int]]) -> None:
        """A verified tree: the children of the root and of each accepted node were tested, the path's accepted."""
        parent = torch.tensor(shape.parent[1:], device=tokens_BN.device)
        q_par = q_BNV[:, parent]  # [B, N, V]: the distribution each node was drafted from
        q_tok = q_par.gather(-1, tokens_BN[:, 1:, None])  # [B, N, 1]
        rank = (q_par > q_tok).sum(-1) + 1
        on_path = torch.zeros(tokens_BN.shape, dtype=torch.bool)
        for b, path in enumerate(paths):
            on_path[b, [0, *path]] = True
        tested = on_path[:, parent.cpu()]
        self.observe(q_tok[..., 0][tested.to(q_tok.device)], rank[tested.to(rank.device)], on_path[:, 1:][tested])

    def table(self) -> dict:
        """The counts, for metrics: per rank, tested and accepted per probability bin (upper edges `EDGES`, then 1)."""
        return {"edges": [*self.EDGES, 1.0], "tested": self.tested.tolist(), "accepted": self.accepted.tolist()}

    @staticmethod
    def by_rank(tables: list[dict]) -> dict:
        """Counts (`table`s, e.g. one per server) summed by rank: the share accepted of the nodes tested (their
        parent accepted), and the nodes tested (decayed counts). Ranks: "rank 1", ..., "rank R+" for R and below."""
        ranks = len(tables[0]["tested"])
        out = {}
        for r in range(ranks):
            tested = sum(sum(t["tested"][r]) for t in tables)
            accepted = sum(sum(t["accepted"][r]) for t in tables)
            out[f"rank {r + 1}{'+' if r + 1 == ranks else ''}"] = {"accepted": accepted / tested if tested else 0.0,
                                                                   "tested": tested}
        return out


class HeadTrace:
    """What decoding saw of the target, per request: the final sequence (`tokens`, [B, L]) and, for positions
    0..L-2, the target's raw features there (the three blocks' outputs side by side, [B, L-1, 3D]) and its
    distribution for the next token, top-k kept ([B, L-1, K] ids and probabilities)."""

    def __init__(self, topk: int = 32) -> None:
        self.topk = topk
        self.feats: list[torch.Tensor] = []
        self.idx: list[torch.Tensor] = []
        self.p: list[torch.Tensor] = []
        self.tokens: torch.Tensor | None = None

    def add(self, raw_BnF: torch.Tensor, p_BnV: torch.Tensor) -> None:
        top_p, top_i = p_BnV.float().topk(min(self.topk, p_BnV.shape[-1]), dim=-1)
        self.feats.append(raw_BnF.float())
        self.idx.append(top_i)
        self.p.append(top_p)

    def rows(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per request (tokens [L], features [L-1, 3D], top-k ids and probabilities [L-1, K]), on the CPU."""
        n = self.tokens.shape[1] - 1
        f, i, p = (torch.cat(x, 1)[:, :n].cpu() for x in (self.feats, self.idx, self.p))
        return [(self.tokens[b].cpu(), f[b], i[b], p[b]) for b in range(self.tokens.shape[0])]


@torch.no_grad()
def head_generate(target, head: DraftHead, layers: list[int], prompt_BP: torch.Tensor, max_new: int,
                  gamma=4, tree: list[int] | None = None, greedy: bool = False, temperature: float = 1.0,
                  generator: torch.Generator | None = None, on_round=None, trace: HeadTrace | None = None,
                  dynamic: tuple[int, int, int] | None = None, acceptance: Acceptance | None = None):
    """Speculative decoding with a draft head over `target` (an expertmesh Transformer). Each round the head
    catches up on the positions the target has verified (their features from the target's own verification
    forward, kept by hooks), drafts a tree (`tree`: children per depth; default a chain of `gamma`) level by
    level on its own features, and the target verifies the whole tree in one forward (tree positions and an
    ancestor mask over its KV cache; `verify_tree`: lossless). Requests advance in lockstep as in
    `speculative_generate`: a round keeps the shortest accepted path's length.
    `dynamic = (nodes, depth, topk)` drafts EAGLE-2's dynamic tree instead (greedy only; `_draft_dynamic`); `nodes`
    may be a `CostTree`, which sizes each round's tree and learns from what the round kept.
    `acceptance` (greedy only) values a dynamic tree's candidates by the counted chance that the target accepts
    them instead of the head's probabilities, and counts each round's verdicts into it (`Acceptance`).
    `gamma` may be a rule (`AdaptiveGamma`, `CostGamma`) that sets each round's chain length from the last.
    `on_round(drafted, depth, accepted, alpha_B)` sees each round: tokens drafted per request, the tree's depth,
    each request's accepted path length and its expected acceptance (the mean over the tree's inner nodes of
    sum_v min(p, q); a chain's is `verify`'s alpha). `trace` collects, for every position of the final
    sequences, the target's raw features and top-k distribution from the passes that verified it (training
    data for the head, no extra target forward). Returns (generated tokens [B, max_new], DecodeStats)."""
    from expertmesh.distill.speculative import DecodeStats, _probs

    rule = gamma if hasattr(gamma, "update") else None  # AdaptiveGamma / CostGamma: the chain's length moves
    tree_rule = dynamic[0] if dynamic is not None and not isinstance(dynamic[0], int) else None  # CostTree
    if rule is not None and (tree is not None or dynamic is not None):
        raise ValueError("a gamma rule sizes chains: pass a fixed tree or dynamic tree without it")
    gamma = rule.gamma if rule is not None else gamma
    shape = Tree(tree if tree is not None else [1] * gamma)
    if dynamic is not None and not greedy:
        raise ValueError("a dynamic tree keeps each node's top-k children, which sampling's acceptance rule (children "
                         "drawn i.i.d. from q) does not allow: decode greedily, or use a static tree")
    if acceptance is not None and not greedy:
        raise ValueError("acceptance counts greedy verdicts (a token accepted when it is the target's argmax): "
                         "decode greedily, or leave it out")
    if max_new < 1 or prompt_BP.shape[1] < 2:
        raise ValueError(f"max_new={max_new} must be >= 1 and a prompt at least 2 tokens (got {prompt_BP.shape[1]}):"
                         " the head starts from the target's features of a position")
    kept: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args, out):
            kept[i] = out[0] if isinstance(out, tuple) else out
        return hook

    hooks = [target.layers[str(i)].register_forward_hook(keep(i)) for i in sorted(set(layers))]
    emb, lm_head = target.tok_embeddings, target.output.weight
    dtype = head.fuse.weight.dtype

    def raw():
        return torch.cat([kept[i] for i in layers], -1)

    def fused(raw_BnF):
        return head.fuse(raw_BnF.to(dtype))

    def probs(o):
        return _probs(head.logits(o, lm_head.to(dtype)), temperature)

    try:
        B, P = prompt_BP.shape
        seq = prompt_BP.clone()
        t_cache = target.make_cache()
        t_logits, _ = target(seq[:, :-1], t_cache)
        prefix = raw()
        if trace is not None:
            trace.add(prefix, _probs(t_logits, temperature))
        feats = fused(prefix)  # [B, n, D]: the target's features of positions 0..n-1, n = t_cache.length = L - 1
        h_cache: list = [None] * len(head.layers)
        h_len = 0
        stats = DecodeStats(accepted_lengths=[])
        while seq.shape[1] - P < max_new:
            L = seq.shape[1]
            x = head.inputs(feats[:, h_len:L - 1], emb(seq[:, h_len + 1:L]).to(dtype))
            out, h_cache = _decode(head, x, h_len, h_cache)
            h_len = L - 1
            step = (_draft_dynamic(head, out[:, -1:], seq[:, -1], h_len, h_cache, dynamic, emb, probs, dtype,
                                   acceptance)
                    if dynamic is not None else
                    _draft_static(head, shape, out[:, -1:], seq[:, -1], h_len, h_cache, greedy, generator, emb,
                                  probs, dtype))
            shape, tokens, q = step
            anc = shape.ancestors.to(seq.device)
            depth = torch.tensor(shape.depth, device=seq.device)
            inner = [s for s in range(shape.size + 1) if shape.children[s]]  # slots whose children came from their q
            t_logits, _ = target(tokens, t_cache, tree=(depth, anc))
            p = _probs(t_logits, temperature)
            verdicts = verify_tree(p, q, tokens, shape, greedy, generator)
            m = min(len(path) for path, _ in verdicts)
            # each request keeps m nodes of its path, then its own next token (its bonus/residual token when
            # it accepted exactly m, else its accepted node m: a draw from the target's distribution too)
            slots = torch.tensor([[0, *path[:m]] for path, _ in verdicts], dtype=torch.long, device=seq.device)
            nxt = torch.tensor([nt if len(path) == m else int(tokens[b, path[m]])
                                for b, (path, nt) in enumerate(verdicts)], device=seq.device)
            seq = torch.cat([seq, tokens.gather(1, slots[:, 1:]), nxt[:, None]], 1)
            t_cache.keep(torch.cat([torch.arange(L - 1, device=seq.device).expand(B, -1), L - 1 + slots], 1))
            kept_raw = raw().gather(1, slots[..., None].expand(-1, -1, len(layers) * feats.shape[-1]))
            feats = torch.cat([feats, fused(kept_raw)], 1)
            if acceptance is not None:
                acceptance.observe_round(shape, tokens, q, [path for path, _ in verdicts])
            accepted = [len(path) for path, _ in verdicts]
            stats.count(shape.size, accepted, m)
            if on_round is not None:
                on_round(shape.size, len(shape.levels), accepted,
                         torch.minimum(p[:, inner], q[:, inner]).sum(-1).mean(-1).tolist())
            if trace is not None:
                trace.add(kept_raw, p.gather(1, slots[..., None].expand(-1, -1, p.shape[-1])))
            if rule is not None:
                shape = Tree([1] * rule.update(sum(accepted) / len(accepted) / shape.size))
            if tree_rule is not None:
                tree_rule.update(m)
        if trace is not None:
            trace.tokens = seq
        return seq[:, P:P + max_new], stats
    finally:
        for h in hooks:
            h.remove()


def _draft_static(head, shape: Tree, out_root, root_B, ctx: int, h_cache: list, greedy: bool, generator, emb, probs,
                  dtype):
    """A static tree (a chain: branch 1 everywhere), level by level: each node's children are the top-b tokens of
    its q (greedy) or b draws from it. Returns (the tree, tokens [B, nodes], q [B, nodes, V] at the inner nodes)."""
    B = root_B.shape[0]
    N1 = shape.size + 1
    tokens = torch.zeros(B, N1, dtype=torch.long, device=root_B.device)
    tokens[:, 0] = root_B
    q = None
    outs = {0: out_root}  # slot -> the head's output there
    tree_kv: list = [None] * len(head.layers)
    parents = [0]
    anc = shape.ancestors.to(root_B.device)
    for d, level in enumerate(shape.levels, start=1):
        for parent in parents:  # its children: the top-b of its q (greedy), or b draws from it
            qp = probs(outs[parent])[:, 0]
            if q is None:
                q = torch.zeros(B, N1, qp.shape[-1], dtype=torch.float64, device=root_B.device)
            q[:, parent] = qp
            kids = shape.children[parent]
            tokens[:, kids] = q[:, parent].topk(len(kids), -1).indices if greedy else \
                torch.multinomial(q[:, parent], len(kids), replacement=True, generator=generator)
        if d < len(shape.levels):  # the leaves' own outputs are never read
            x = head.inputs(torch.cat([outs[shape.parent[s]] for s in level], 1), emb(tokens[:, level]).to(dtype))
            o, tree_kv = _decode_level(head, x, ctx, h_cache, tree_kv, anc[level][:, 1:level[-1] + 1], d)
            outs.update({s: o[:, i:i + 1] for i, s in enumerate(level)})
        parents = level
    return shape, tokens, q


def _draft_dynamic(head, out_root, root_B, ctx: int, h_cache: list, spec: tuple, emb, probs, dtype,
                   acceptance: Acceptance | None = None):
    """EAGLE-2's dynamic tree, one shape for the batch: `spec = (nodes, depth, k)`. Each of `depth` levels gives
    every frontier node its top-k children (per request: that request's top-k tokens, scored by the path's
    probability under the head); the k candidates of highest probability (the mean over the batch's requests)
    form the next frontier and go through the head. The `nodes` candidates of highest probability are the tree:
    a path's probability only falls along it, so every chosen node's parent is chosen too (ties keep the order
    of creation). `nodes` may be a rule (`CostTree`) that decides after each level whether another one pays
    (`deeper`), values the candidates (`value`: each after its parent) and chooses how many to verify
    (`choose`). With `acceptance`, a path's probability is the product of its nodes' counted chances of
    acceptance instead of the head's probabilities. Returns (the tree, tokens [B, nodes + 1], q [B, nodes + 1,
    V] at the inner nodes)."""
    nodes, depth, k = spec
    parent, token, logp = [-1], [root_B], [torch.zeros(root_B.shape[0], dtype=torch.float64, device=root_B.device)]
    score = [1.0]  # per candidate: its path's probability under the head, the mean over the requests
    level = [0]
    outs, qs = {0: out_root}, {}
    expanded: list[int] = []  # candidates that went through the head (below the root), in order: tree_kv's keys
    tree_kv: list = [None] * len(head.layers)
    frontier = [0]
    lineage: dict[int, set[int]] = {0: set()}  # the root is no key of the tree's cache
    for d in range(1, depth + 1):
        born = []
        q_fV = probs(torch.cat([outs[f] for f in frontier], 1))  # [B, frontier, V]: one LM-head pass a level
        top = q_fV.topk(min(k, q_fV.shape[-1]), -1)  # [B, frontier, k]
        kk = top.indices.shape[-1]
        edge = top.values if acceptance is None else acceptance(top.values, torch.arange(1, kk + 1))
        lp = torch.stack([logp[f] for f in frontier], 1)[..., None] + edge.clamp_min(1e-300).log()
        for i, f in enumerate(frontier):
            qs[f] = q_fV[:, i]
            for r in range(kk):
                parent.append(f)
                token.append(top.indices[:, i, r])
                logp.append(lp[:, i, r])
                level.append(d)
                born.append(len(parent) - 1)
        born_score = lp.exp().mean(0).flatten()  # the same order as `born`
        score += born_score.tolist()
        if d == depth or (not isinstance(nodes, int) and
                          not nodes.deeper(d, list(zip(score[1:], level[1:], strict=True)),
                                           [(parent[c], score[parent[c]], score[c]) for c in born], k)):
            break
        frontier = [born[i] for i in sorted(born_score.topk(min(k, len(born))).indices.tolist())]
        x = head.inputs(torch.cat([outs[parent[c]] for c in frontier], 1),
                        emb(torch.stack([token[c] for c in frontier], 1)).to(dtype))
        seen = expanded + frontier
        for c in frontier:  # each frontier node's lineage (itself and its ancestors below the root)
            lineage[c] = lineage[parent[c]] | {c}
        mask = torch.tensor([[a in lineage[c] for a in seen] for c in frontier], device=root_B.device)
        o, tree_kv = _decode_level(head, x, ctx, h_cache, tree_kv, mask, d)
        outs.update({c: o[:, i:i + 1] for i, c in enumerate(frontier)})
        expanded = seen
    # the candidates in order of value, each after its parent (so every prefix is a tree): the head's probability
    # of the path (a parent's is at least its child's), or what a rule makes of it (CostTree: calibrated by depth)
    value = (lambda c: score[c]) if isinstance(nodes, int) else (lambda c: nodes.value(score[c], level[c]))
    kids: dict[int, list[int]] = {}
    for c in range(1, len(parent)):
        kids.setdefault(parent[c], []).append(c)
    closed: list[int] = []
    ready = [(-value(c), c) for c in kids.get(0, [])]
    heapq.heapify(ready)
    while ready:
        _, c = heapq.heappop(ready)
        closed.append(c)
        for child in kids.get(c, []):
            heapq.heappush(ready, (-value(child), child))
    n = nodes if isinstance(nodes, int) else nodes.choose([(score[c], level[c]) for c in closed], d)
    chosen = sorted(closed[:n])  # creation order: parents before children
    slot = {0: 0, **{c: i + 1 for i, c in enumerate(chosen)}}
    shape = Tree.from_parents([-1, *[slot[parent[c]] for c in chosen]])
    tokens = torch.stack([token[0], *[token[c] for c in chosen]], 1)
    V = qs[0].shape[-1]
    q = torch.zeros(tokens.shape[0], len(slot), V, dtype=torch.float64, device=root_B.device)
    for c, s_ in slot.items():
        if shape.children[s_]:
            q[:, s_] = qs[c]
    return shape, tokens, q


def _decode_level(head: DraftHead, x_BnD: torch.Tensor, ctx: int, h_cache: list, tree_kv: list,
                  mask_tree: torch.Tensor, depth: int) -> tuple[torch.Tensor, list]:
    """One level of a tree of drafts through the head: its nodes at position ctx + depth - 1 attend to the
    head's cached positions and to their ancestors among the tree nodes so far (`mask_tree`: [n, nodes]).
    Returns the output and the tree's keys with this level's."""
    n = x_BnD.shape[1]
    cos = head.rope_cos[ctx + depth - 1].expand(n, -1)
    sin = head.rope_sin[ctx + depth - 1].expand(n, -1)
    mask = torch.cat([torch.ones(n, ctx, dtype=torch.bool, device=x_BnD.device), mask_tree], 1)
    x_BnD, new = _layers(head, x_BnD, cos, sin, mask, [[kv, tkv] for kv, tkv in zip(h_cache, tree_kv, strict=True)])
    return x_BnD, [_joined(tkv, n) for tkv, n in zip(tree_kv, new, strict=True)]


def save_head(head: DraftHead, layers: list[int], model: ModelConfig, h: DraftHeadConfig, out, extra: dict):
    """Writes a head where `load_head` reads it (`model.safetensors` + `draft_head.json` with the blocks it reads,
    its shape, the target's model config and `extra`), atomically: a temp directory put in place whole."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from expertmesh.distill.models import publish_dir

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp / "model.safetensors"))
    meta = {**extra, "layers": list(layers), "draft_head": vars(h), "model": vars(model)}
    (tmp / "draft_head.json").write_text(json.dumps(meta, indent=1) + "\n")
    return publish_dir(tmp, out)


def load_head(path, device=None) -> tuple[DraftHead, list[int], dict]:
    """A head saved beside a run (`runs/<name>/draft_head/`): the head, the target blocks it reads, its metadata."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "draft_head.json").read_text())
    head = DraftHead(ModelConfig(**meta["model"]), DraftHeadConfig(**meta["draft_head"]))
    head.load_state_dict(load_file(str(path / "model.safetensors")))
    return head.to(device) if device is not None else head, list(meta["layers"]), meta
