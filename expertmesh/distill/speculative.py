"""Lossless speculative decoding: the acceptance rule that makes draft-then-verify sample exactly the
target's distribution (Leviathan et al. 2023; Chen et al. 2023).

Legend: B requests, G = gamma drafted tokens, V vocabulary. For each request the draft proposed
x_0..x_{G-1} with probabilities q_i(.), and the target scored all G + 1 positions in one forward:
p_0..p_G. Sampling mode: x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), left to right;
at the first rejection j the next token is drawn from norm(max(0, p_j - q_j)); if all G are accepted,
a bonus token is drawn from p_G. Each emitted token is then distributed exactly as p. Greedy mode
accepts x_i only when it is the target's argmax, and emits the target's argmax after the last
accepted one, so the output equals the target's own greedy decoding token for token.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Verdict:
    accepted_B: torch.Tensor  # int64: how many drafted tokens each request keeps (0..G)
    next_token_B: torch.Tensor  # int64: the token emitted after them (residual, or bonus when all kept)
    alpha_B: torch.Tensor  # mean over the drafted positions of sum_v min(p, q): the expected acceptance rate


def verify(p_BG1V: torch.Tensor, q_BGV: torch.Tensor, draft_BG: torch.Tensor, greedy: bool = False,
           generator: torch.Generator | None = None) -> Verdict:
    B, G, V = q_BGV.shape
    if p_BG1V.shape != (B, G + 1, V) or draft_BG.shape != (B, G):
        raise ValueError(f"target probabilities {tuple(p_BG1V.shape)} must be [B, G+1, V] = {(B, G + 1, V)} and "
                         f"drafted tokens {tuple(draft_BG.shape)} [B, G] = {(B, G)}")
    p, q = p_BG1V.double(), q_BGV.double()
    alpha_B = torch.minimum(p[:, :G], q).sum(-1).mean(-1) if G else torch.ones(B, dtype=torch.float64)
    if greedy:
        ok_BG = p[:, :G].argmax(-1) == draft_BG
    else:
        px = p[:, :G].gather(-1, draft_BG[..., None])[..., 0]
        qx = q.gather(-1, draft_BG[..., None])[..., 0]
        u = torch.rand(B, G, dtype=torch.float64, generator=generator, device=p.device)
        ok_BG = u * qx < px  # u < p/q without dividing by a zero q
    accepted_B = ok_BG.long().cumprod(-1).sum(-1)
    rows = torch.arange(B, device=p.device)
    p_next = p[rows, accepted_B]  # [B, V]: p at the first rejected position, or p_G for the bonus
    if greedy:
        return Verdict(accepted_B, p_next.argmax(-1), alpha_B)
    rejected = accepted_B < G
    q_next = torch.zeros_like(p_next)
    q_next[rejected] = q[rows[rejected], accepted_B[rejected]]
    residual = (p_next - q_next).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    dist = torch.where(mass > 0, residual / mass.clamp_min(1e-300), p_next)  # p == q: any draw from p is right
    next_token_B = torch.multinomial(dist, 1, generator=generator)[:, 0]
    return Verdict(accepted_B, next_token_B, alpha_B)


@dataclass
class DecodeStats:
    drafted: int = 0  # draft tokens proposed (per request, summed)
    accepted: int = 0  # of those, accepted by the rule (per request, before lockstep truncation)
    alpha_sum: float = 0.0  # sum over rounds and requests of the expected acceptance rate
    rounds: int = 0  # draft/verify rounds, each one target forward for the whole batch
    emitted: int = 0  # tokens emitted, all requests
    rounds_requests: int = 0  # rounds x requests: the alpha_sum's count
    accepted_lengths: list[int] | None = None

    def count(self, drafted: int, accepted: list[int], kept: int, alpha_sum: float = 0.0) -> None:
        """One round: `drafted` tokens per request, each request's accepted drafts, `kept` per request (lockstep)."""
        B = len(accepted)
        self.rounds += 1
        self.drafted += drafted * B
        self.accepted += sum(accepted)
        self.alpha_sum += alpha_sum
        self.rounds_requests += B
        self.emitted += (kept + 1) * B
        self.accepted_lengths.extend(accepted)

    @property
    def alpha(self) -> float:
        return self.alpha_sum / max(self.rounds_requests, 1)

    @property
    def target_forwards(self) -> int:
        return self.rounds

    @property
    def tokens_per_target_forward(self) -> float:
        """Tokens one request gains per target forward (plain decoding: 1)."""
        return self.emitted / max(self.rounds_requests, 1)


class AdaptiveGamma:
    """Draft length from the recent acceptance: after each round, gamma grows by one when the requests
    kept at least `grow` of their drafts on average over the last `window` rounds, and shrinks by one
    below `shrink`, within [lo, hi]."""

    def __init__(self, gamma: int, lo: int = 1, hi: int = 8, grow: float = 0.8, shrink: float = 0.4,
                 window: int = 8) -> None:
        if not 1 <= lo <= gamma <= hi:
            raise ValueError(f"adaptive gamma needs 1 <= lo={lo} <= gamma={gamma} <= hi={hi}")
        self.gamma, self.lo, self.hi, self.grow, self.shrink = gamma, lo, hi, grow, shrink
        self.recent: list[float] = []
        self.window = window

    def update(self, accepted_fraction: float) -> int:
        self.recent = (self.recent + [accepted_fraction])[-self.window:]
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) == self.window and mean >= self.grow and self.gamma < self.hi:
            self.gamma, self.recent = self.gamma + 1, []
        elif len(self.recent) == self.window and mean < self.shrink and self.gamma > self.lo:
            self.gamma, self.recent = self.gamma - 1, []
        return self.gamma


@torch.no_grad()
def measure_costs(target, draft, batch: int, prompt_len: int, sizes: list[int], vocab: int, reps: int = 5,
                  device=None) -> dict:
    """Seconds of one target forward over n new tokens per request after a cached prompt, at this batch size
    (the median of `reps`, then made non-decreasing in n: `monotone`; as measured: `verify_measured_s`), for
    each n in `sizes`; and of one draft forward over one token. A MoE target
    wakes more experts the more tokens a pass carries, so its n-token pass costs more than a dense one's
    against its one-token pass (MoESD); that, not acceptance alone, decides how much to draft. A draft with a
    `step_seconds(batch, prompt_len, reps)` (a draft head) times its own step."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)

    def timed(model, n):
        times = []
        for _ in range(reps + 1):  # the first warms up
            cache = model.make_cache()
            model(prompt, cache)
            chunk = torch.randint(0, vocab, (batch, n), generator=g).to(device)
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(chunk, cache)
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    measured = {n: timed(target, n) for n in sorted(set(sizes))}
    verify = dict(zip(measured, monotone(list(measured.values())), strict=True))
    draft_s = draft.step_seconds(batch, prompt_len, reps) if hasattr(draft, "step_seconds") else timed(draft, 1)
    return {"batch": batch, "prompt_len": prompt_len, "verify_s": verify, "verify_measured_s": measured,
            "draft_s": draft_s, "verify_relative": {n: t / verify[min(verify)] for n, t in verify.items()}}


def monotone(ys: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `ys` in least squares (pool adjacent violators): a pass over more
    tokens never costs less, so a timing below its predecessor's is noise, pooled with it."""
    blocks: list[list[float]] = []  # [mean, count]
    for y in ys:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
    return [m for m, c in blocks for _ in range(c)]


class CostGamma:
    """Draft length from the measured costs and the recent acceptance: after each round, the gamma in [lo, hi]
    that maximizes the expected tokens per second of a round, (1 - a^(gamma+1)) / (1 - a) tokens for
    gamma * draft_s + verify_s[gamma + 1] seconds, where a is the per-token acceptance estimated over the last
    `window` rounds (accepted drafts over accepted drafts plus rejections: each round's first rejection ends
    it). The same interface as AdaptiveGamma."""

    def __init__(self, costs: dict, lo: int, hi: int, gamma: int, window: int = 16, prior: float = 0.5) -> None:
        missing = [n for n in range(lo + 1, hi + 2) if n not in costs["verify_s"]]
        if not 1 <= lo <= gamma <= hi or missing:
            raise ValueError(f"cost gamma needs 1 <= lo={lo} <= gamma={gamma} <= hi={hi} and verify costs for "
                             f"{lo + 1}..{hi + 1} tokens (missing {missing})")
        self.costs, self.lo, self.hi, self.gamma, self.window = costs, lo, hi, gamma, window
        self.recent: list[tuple[int, int]] = []  # (accepted, rejected) per round
        self.alpha = prior

    def best(self, alpha: float) -> int:
        a = min(max(alpha, 0.0), 1.0 - 1e-9)
        rate = {g: (1 - a ** (g + 1)) / (1 - a) / (g * self.costs["draft_s"] + self.costs["verify_s"][g + 1])
                for g in range(self.lo, self.hi + 1)}
        return max(rate, key=rate.get)

    def update(self, accepted_fraction: float) -> int:
        accepted = round(accepted_fraction * self.gamma)
        self.recent = (self.recent + [(accepted, int(accepted < self.gamma))])[-self.window:]
        kept, rejected = sum(a for a, _ in self.recent), sum(r for _, r in self.recent)
        self.alpha = kept / max(kept + rejected, 1)
        self.gamma = self.best(self.alpha)
        return self.gamma


class CostTree:
    """A dynamic tree's depth and size from the measured costs. Each round the tree grows level by level; after
    level d the rule predicts level d + 1 (the k most probable new candidates each get children as likely,
    relative to their parent, as this level's were on average) and grows it only if that raises the best
    expected tokens per second of the round. Then, of the candidates ordered by value (the head's probability of
    their path, EAGLE-2's estimate of the chance each is accepted, calibrated for its depth: `value`; each after
    its parent, so every prefix is a tree), it verifies the first n in [lo, hi] with the most expected tokens per
    second: 1 + the sum of their values tokens for draft_s * depth + verify_s[n + 1] seconds (the tree's levels
    through the head, then one target pass over the root and n nodes). Calibration is per depth: at most one node of a
    depth lies on the accepted path, so the probabilities of a round's nodes at depth d sum to the chance it
    keeps d tokens or more; c_d, over the last `window` rounds, is the rounds that did (the batch's lockstep
    length) over those sums (1 before any data; a depth not verified lately takes the one above's, and a level
    guessed below them all is worth what the measured chance of keeping one more level makes it: `deeper`). A MoE
    target whose passes cost more per token (MoESD) verifies fewer nodes at the same confidence; a head whose
    step is dear against the pass drafts shallower trees; a head surer than it says drafts deeper ones."""

    def __init__(self, costs: dict, lo: int, hi: int, window: int = 16) -> None:
        missing = [n for n in range(lo + 1, hi + 2) if n not in costs["verify_s"]]
        if not 1 <= lo <= hi or missing:
            raise ValueError(f"cost tree needs 1 <= lo={lo} <= hi={hi} and verify costs for {lo + 1}..{hi + 1} "
                             f"tokens (missing {missing})")
        self.costs, self.lo, self.hi, self.window = costs, lo, hi, window
        self.recent: list[tuple[int, list[float]]] = []  # per round: kept, probability sums by depth (1, 2, ...)
        self.calibration: list[float] = []  # c_1, c_2, ... (beyond: the last, or 1)
        self.nodes, self.depth, self.predicted = hi, 0, []

    def c(self, depth: int) -> float:
        return self.calibration[min(depth, len(self.calibration)) - 1] if self.calibration else 1.0

    def value(self, score: float, depth: int) -> float:
        """A candidate's expected tokens: its path's probability under the head, calibrated for its depth."""
        return self.c(depth) * score

    def _worth(self, cand: tuple) -> float:
        return cand[2] if len(cand) > 2 else self.value(cand[0], cand[1])

    def best(self, cands: list[tuple], depth: int) -> tuple[int, float]:
        """For candidates (path probability, depth[, expected tokens if already known]) in order, grown to
        `depth` levels: the n with the most expected tokens per second, and that rate."""
        draft_s = self.costs["draft_s"] * depth
        top = min(self.hi, len(cands))
        sums = [0.0]
        for cand in cands[:top]:
            sums.append(sums[-1] + self._worth(cand))
        rate = {n: (1 + sums[n]) / (draft_s + self.costs["verify_s"][n + 1])
                for n in range(min(self.lo, top), top + 1) if n >= 1}
        n = max(rate, key=rate.get)
        return n, rate[n]

    def go_on(self) -> float:
        """The chance that a round which kept as deep as verified lately keeps one more: over the last rounds
        that verified their deepest depth L, those that kept L over those that kept L - 1."""
        L = len(self.calibration)
        reached = [k for k, p in self.recent if len(p) >= L]
        below = sum(k >= L - 1 for k in reached)
        return sum(k >= L for k in reached) / below if below else 1.0

    def deeper(self, depth: int, cands: list[tuple[float, int]], born: list[tuple[int, float, float]],
               k: int) -> bool:
        """After level `depth`: whether growing one more pays. `cands`: every candidate's (probability, depth) so
        far; `born`: this level's, each as (its parent, the parent's probability, its own), likeliest first among
        siblings. The guessed level's candidates are calibrated as their depth is when recent rounds verified it;
        deeper than any has lately, each is worth its parent's calibrated value times the measured chance of
        keeping one more (`go_on`), shared among siblings as the head's probabilities are."""
        ratios: dict[int, list[float]] = {}
        for parent, p, s in born:
            ratios.setdefault(parent, []).append(s / p if p > 0 else 0.0)
        width = min(len(r) for r in ratios.values())
        profile = [sum(r[i] for r in ratios.values()) / len(ratios) for i in range(width)]
        frontier = sorted((s for _, _, s in born), reverse=True)[:k]
        if depth + 1 <= len(self.calibration) or not self.calibration:
            guess = [(s * r, depth + 1) for s in frontier for r in profile]
        else:
            a, top = self.go_on(), profile[0] if profile[0] > 0 else 1.0
            guess = [(s * r, depth + 1, self.c(depth) * s * a * r / top) for s in frontier for r in profile]
        return (self.best(sorted(cands + guess, key=self._worth, reverse=True), depth + 1)[1] >
                self.best(sorted(cands, key=self._worth, reverse=True), depth)[1])

    def choose(self, cands: list[tuple[float, int]], depth: int) -> int:
        """How many of these candidates (in order) to verify; remembers their probability sums by depth."""
        self.nodes, _ = self.best(cands, depth)
        self.depth = depth
        self.predicted = [0.0] * max((d for _, d in cands[:self.nodes]), default=0)
        for s, d in cands[:self.nodes]:
            self.predicted[d - 1] += s
        return self.nodes

    def update(self, kept: int) -> None:
        """After the round `choose` sized: the drafts the batch kept."""
        self.recent = (self.recent + [(kept, self.predicted)])[-self.window:]
        deepest = max(len(p) for _, p in self.recent)
        self.calibration = []
        for d in range(1, deepest + 1):
            rounds = [(k, p[d - 1]) for k, p in self.recent if len(p) >= d and p[d - 1] > 0]
            mass = sum(p for _, p in rounds)
            self.calibration.append(sum(k >= d for k, _ in rounds) / mass if mass > 0 else self.c(d - 1) if d > 1
                                    else 1.0)


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (greedy=True for argmax decoding)")
    return torch.softmax(logits.double() / temperature, -1)


def advance(seq_BL: torch.Tensor, drafts_BG: torch.Tensor, v: Verdict, stats: DecodeStats) -> torch.Tensor:
    """One round's tokens appended in lockstep: every request keeps m = the fewest drafts any request accepted,
    then its own next token (its residual/bonus token when it accepted exactly m, else its own accepted draft
    at position m, which is a valid draw too); the round counted in `stats`."""
    gamma = drafts_BG.shape[1]
    m = int(v.accepted_B.min())
    own = drafts_BG[:, m] if m < gamma else v.next_token_B
    nxt = torch.where(v.accepted_B == m, v.next_token_B, own)
    stats.count(gamma, v.accepted_B.tolist(), m, float(v.alpha_B.sum()))
    return torch.cat([seq_BL, drafts_BG[:, :m], nxt[:, None]], 1)


@torch.no_grad()
def speculative_generate(target, draft, prompt_BP: torch.Tensor, max_new: int, gamma: int | AdaptiveGamma,
                         greedy: bool = False,
                         temperature: float = 1.0, generator: torch.Generator | None = None, on_round=None):
    """Generates `max_new` tokens per request with `draft` proposing `gamma` tokens (fixed, or an
    `AdaptiveGamma` that moves with the acceptance) and `target`
    verifying them in one forward; both keep a KV cache (`make_cache()` / `model(tokens, cache)`: an
    expertmesh Transformer or an `HFCausalLM`).

    Requests of a batch advance in lockstep: a round keeps m = the fewest drafts any request accepted,
    and each request emits its own next token after those m (its residual/bonus token when it accepted
    exactly m, else its own accepted draft at position m, which is a valid draw too). So caches stay
    rectangular and every request's output is still distributed exactly as the target's.
    `on_round(seq_BL, drafts_BG, p_BG1V, verdict)` sees each round's verification data (distillation).
    Returns (generated tokens [B, max_new], DecodeStats)."""
    adaptive = gamma if isinstance(gamma, AdaptiveGamma | CostGamma) else None
    gamma = adaptive.gamma if adaptive is not None else gamma
    if gamma < 1 or max_new < 1:
        raise ValueError(f"gamma={gamma} and max_new={max_new} must be >= 1")
    seq = prompt_BP.clone()
    t_cache, d_cache = target.make_cache(), draft.make_cache()
    stats = DecodeStats(accepted_lengths=[])
    P = prompt_BP.shape[1]
    while seq.shape[1] - P < max_new:
        # draft: catch up on the tokens it has not seen, then propose gamma tokens one by one
        logits, _ = draft(seq[:, d_cache.length:], d_cache)
        drafts, q = [], []
        for i in range(gamma):
            qi = _probs(logits[:, -1], temperature)
            xi = qi.argmax(-1) if greedy else torch.multinomial(qi, 1, generator=generator)[:, 0]
            drafts.append(xi)
            q.append(qi)
            if i + 1 < gamma:
                logits, _ = draft(xi[:, None], d_cache)
        drafts_BG = torch.stack(drafts, 1)
        # target: the unseen tokens plus the drafts in one forward; p_0..p_G are its last G + 1 positions
        base = t_cache.length
        t_logits, _ = target(torch.cat([seq[:, base:], drafts_BG], 1), t_cache)
        p_BG1V = _probs(t_logits[:, -(gamma + 1):], temperature)
        v = verify(p_BG1V, torch.stack(q, 1), drafts_BG, greedy=greedy, generator=generator)
        if on_round is not None:
            on_round(seq, drafts_BG, p_BG1V, v)
        seq = advance(seq, drafts_BG, v, stats)
        t_cache.crop(seq.shape[1] - 1)  # everything but the newest token, which is fed next round
        d_cache.crop(min(d_cache.length, seq.shape[1] - 1))
        if adaptive is not None:
            gamma = adaptive.update(float(v.accepted_B.double().mean()) / gamma)
    return seq[:, P:P + max_new], stats
