"""GRPO's advantages and loss against a transcription of TRL's ``GRPOTrainer`` formulas.

``trl_advantages`` and ``trl_loss`` follow TRL's ``_generate_and_score_completions``
and ``_compute_loss`` line by line (same names), for one process with
gradient_accumulation_steps = 1 and the whole batch as one micro-batch, token-level
importance sampling, no entropy mask, no delta, no vLLM correction. Our functions
must give the same loss, gradient and metrics, also when the batch is split into
micro-batches whose shares are summed (gradient accumulation, data parallelism).
"""

from __future__ import annotations

import math

import pytest
import torch

from ironcore.config.base import from_dict
from ironcore.errors import ConfigError
from ironcore.objectives.grpo import GRPOOptions, group_advantages, grpo_loss, nanstd

G, PROMPTS, T = 4, 4, 7
B = G * PROMPTS
MAX_COMPLETION_LENGTH = 10  # longer than T: dr_grpo divides by the option, not by the padded length
EMPTY = 6  # a sequence with no completion token (e.g. a truncated one, masked out)
SPLITS = (5, 3, 8)  # micro-batch sizes; the empty sequence falls in the second


# ---- TRL, transcribed ------------------------------------------------------------------------------------


def trl_nanstd(tensor, dim=None):
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)  # count of non-NaN values
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction  # Bessel's correction
    std = torch.sqrt(variance)
    if dim is None:
        return std.squeeze()
    return std.squeeze(dim)


def trl_advantages(rewards, num_generations, scale_rewards):
    """From the summed rewards (NaN: unscorable) on; returns advantages, std_rewards, is_std_zero, metrics."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = trl_nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # for logging
    advantages = torch.nan_to_num(advantages, nan=0.0)
    metrics = {
        "reward": torch.nanmean(rewards).item(),
        "reward_std": trl_nanstd(rewards).item(),
        "frac_reward_zero_std": is_std_zero.float().mean().item(),
    }
    return advantages, std_rewards, is_std_zero, metrics


def trl_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask,
             loss_type, beta, epsilon, epsilon_high, max_completion_length):
    """The loss of the whole batch and its metrics (kl, clip_ratio/*)."""
    epsilon_low = epsilon
    epsilon_high = epsilon_high if epsilon_high is not None else epsilon
    num_processes = current_gradient_accumulation_steps = 1
    mask = completion_mask
    num_items_in_batch = mask.sum()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    log_ratio = per_token_logps - old_per_token_logps
    log_importance_weights = log_ratio
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        loss = loss / current_gradient_accumulation_steps
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
        loss = loss / current_gradient_accumulation_steps
    elif loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        loss = (per_token_loss * mask).sum() / normalizer

    def global_masked_mean(x):
        local_sum, local_count = (x * mask).sum(), mask.sum().float()
        totals = torch.stack([local_sum, local_count])
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    metrics = {}
    if beta != 0.0:
        metrics["kl"] = global_masked_mean(per_token_kl)
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    metrics["clip_ratio/low_mean"] = global_masked_mean(is_low_clipped.float())
    metrics["clip_ratio/high_mean"] = global_masked_mean(is_high_clipped.float())
    metrics["clip_ratio/region_mean"] = global_masked_mean(is_region_clipped.float())
    return loss, metrics


# ---- inputs ----------------------------------------------------------------------------------------------


def batch() -> dict[str, torch.Tensor]:
    """Seeded, float64 (so the sums' order is no concern): ragged masks, one empty, ratios far from 1."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[EMPTY] = 0
    logps = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    return {
        "logps": logps,
        "old": logps + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64),  # mu > 1: a stale policy
        "ref": logps + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64),
        "advantages": torch.randn(B, generator=gen, dtype=torch.float64),
        "mask": torch.arange(T) < lengths[:, None],
    }


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-12)


# ---- loss ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("stale", [False, True], ids=["old=None", "old=perturbed"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_gradient_and_metrics_equal_trl(loss_type, beta, stale, epsilon_high):
    data = batch()
    options = GRPOOptions(loss_type=loss_type, beta=beta, epsilon_high=epsilon_high,
                          max_completion_length=MAX_COMPLETION_LENGTH)
    old = data["old"] if stale else None
    ref = data["ref"] if beta else None
    mask = data["mask"]

    logps = data["logps"].clone().requires_grad_()
    expected, trl_metrics = trl_loss(logps, old, ref, data["advantages"], mask.int(), loss_type, beta,
                                     options.epsilon, epsilon_high, MAX_COMPLETION_LENGTH)
    (expected_grad,) = torch.autograd.grad(expected, logps)
    if stale:  # the clipping really is exercised, on both sides
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0

    # The whole batch as one micro-batch.
    parts = grpo_loss(logps, old, ref, data["advantages"], mask.double(), options, B, int(mask.sum()))
    (grad,) = torch.autograd.grad(parts.loss, logps)
    close(parts.loss, expected)
    close(grad, expected_grad)
    assert grad[EMPTY].abs().sum() == 0

    # Micro-batches: the shares, their gradients and the metric sums add up to the whole batch's.
    logps = data["logps"].clone().requires_grad_()
    loss, sums = 0.0, torch.zeros(5, dtype=torch.float64)
    for rows in torch.arange(B).split(SPLITS):
        parts = grpo_loss(logps[rows], None if old is None else old[rows], None if ref is None else ref[rows],
                          data["advantages"][rows], mask[rows], options, B, int(mask.sum()))
        parts.loss.backward()
        loss += parts.loss.item()
        sums += torch.stack([parts.tokens, parts.kl_sum, parts.low_clipped, parts.high_clipped,
                             parts.region_clipped]).double()
    close(torch.tensor(loss, dtype=torch.float64), expected.detach())
    close(logps.grad, expected_grad)

    tokens, kl_sum, low, high, region = sums.tolist()
    assert tokens == mask.sum().item()
    metrics = {"clip_ratio/low_mean": low / tokens, "clip_ratio/high_mean": high / tokens,
               "clip_ratio/region_mean": region / tokens}
    if beta:
        metrics["kl"] = kl_sum / tokens
    else:
        assert kl_sum == 0
    assert metrics.keys() == trl_metrics.keys()
    for name, value in trl_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name


def test_clipping_and_kl_change_the_loss():
    """The reference is not degenerate: without clipping, or without the KL term, the loss differs."""
    data = batch()
    args = (data["logps"], data["old"], data["ref"], data["advantages"], data["mask"].int(), "dapo")
    clipped, _ = trl_loss(*args, 0.04, 0.2, None, MAX_COMPLETION_LENGTH)
    unclipped, _ = trl_loss(*args, 0.04, 1e-9, 1e9, MAX_COMPLETION_LENGTH)
    no_kl, _ = trl_loss(*args, 0.0, 0.2, None, MAX_COMPLETION_LENGTH)
    assert not torch.isclose(clipped, unclipped, rtol=1e-3)
    assert not torch.isclose(clipped, no_kl, rtol=1e-3)


def test_empty_sequence_counts_in_the_grpo_mean():
    """TRL clamps an empty sequence's token count to 1: it adds 0 to the sum but counts in the mean."""
    data = batch()
    options = GRPOOptions(loss_type="grpo")
    mask = data["mask"]
    parts = grpo_loss(data["logps"], None, None, data["advantages"], mask, options, B, int(mask.sum()))
    seq_means = (-data["advantages"][:, None] * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    assert torch.isfinite(parts.loss)
    close(parts.loss, seq_means.sum() / B)


def test_beta_without_reference_logps_fails():
    data = batch()
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(data["logps"], None, None, data["advantages"], data["mask"], GRPOOptions(beta=0.04), B, 10)


# ---- advantages ------------------------------------------------------------------------------------------


def rewards() -> torch.Tensor:
    nan = math.nan
    return torch.tensor([
        1.0, 2.0, 3.0, 4.0,
        0.5, 0.5, 0.5, 0.5,  # all equal: std 0, advantages 0
        1.0, nan, 0.0, 2.0,  # one completion no reward function could score
        nan, nan, 3.0, nan,  # a single scored completion: std NaN, advantages 0
        0.3, -1.2, 0.7, 2.5,
    ], dtype=torch.float64)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(scale_rewards):
    r = rewards()
    expected, expected_std, expected_zero, trl_metrics = trl_advantages(r, G, scale_rewards)
    result = group_advantages(r, G, scale_rewards)
    close(result.advantages, expected)
    torch.testing.assert_close(result.std, expected_std, rtol=1e-6, atol=1e-12, equal_nan=True)
    # One difference, by design: a NaN std (under two scored completions) counts as zero std, no spread.
    assert torch.equal(result.is_std_zero, expected_zero | expected_std.isnan())
    trl_metrics["frac_reward_zero_std"] = (expected_zero | expected_std.isnan()).float().mean().item()

    assert not result.advantages.isnan().any()
    assert (result.advantages[[4, 5, 6, 7, 9, 12, 13, 14, 15]] == 0).all()
    assert result.is_std_zero[4:8].all() == (scale_rewards != "batch")
    metrics = {"reward": torch.nanmean(r).item(), "reward_std": nanstd(r).item(),
               "frac_reward_zero_std": result.is_std_zero.float().mean().item()}
    assert metrics == pytest.approx(trl_metrics, rel=1e-12)


def test_group_advantages_by_hand():
    """The first group, [1, 2, 3, 4]: mean 2.5, Bessel std sqrt(5/3)."""
    r = rewards()
    std = math.sqrt(5 / 3)
    by_group = group_advantages(r, G, "group").advantages[:4]
    close(by_group, (r[:4] - 2.5) / (std + 1e-4))
    close(group_advantages(r, G, "none").advantages[:4], r[:4] - 2.5)
    close(nanstd(r[:4]), torch.tensor(std, dtype=torch.float64))


# ---- options ---------------------------------------------------------------------------------------------


def test_defaults_are_trls():
    options = from_dict(GRPOOptions, {"rewards": [{"function": "exact"}]})
    trl = dict(num_generations=8, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=512,
               scale_rewards="group", loss_type="dapo", epsilon=0.2, epsilon_high=None, beta=0.0, num_iterations=1,
               mask_truncated_completions=False)
    assert {key: getattr(options, key) for key in trl} == trl


@pytest.mark.parametrize("key, value, problem", [
    ("num_generations", 1, "must be >= 2"),
    ("epsilon", 0.0, "must be in (0, 1)"),
    ("epsilon_high", -0.1, "must be positive"),
    ("beta", -0.04, "must be >= 0"),
    ("top_p", 0.0, "must be in (0, 1]"),
    ("num_iterations", 0, "must be >= 1, got 0"),
    ("rewards", [], "GRPO needs at least one reward function"),
    ("loss_type", "bnpo", "is not one of grpo, dr_grpo, dapo"),
    ("scale_rewards", "std", "is not one of group, batch, none"),
])
def test_bad_options_name_the_key(key, value, problem):
    with pytest.raises(ConfigError) as info:
        from_dict(GRPOOptions, {"rewards": [{"function": "exact"}], key: value}, "trainer.objective_options")
    message = str(info.value)
    assert message.startswith(f"config key 'trainer.objective_options.{key}': ")
    assert problem in message and "\n" not in message
