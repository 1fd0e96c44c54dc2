import pytest
import torch

from hnet.experiments.proxies import linear_cka, mutual_knn, ridge_retrieval, score


def _hsic_cka(x, y):
    """CKA the textbook way: HSIC of centred n x n linear kernels."""
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    return float((kx * ky).sum() / ((kx * kx).sum().sqrt() * (ky * ky).sum().sqrt()))


def test_linear_cka_equals_kernel_form_and_invariances():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(50, 5, generator=g)
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), rel=1e-9)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x @ rotation * 3.0 + 2.0, x) == pytest.approx(1.0, rel=1e-9)
    assert linear_cka(x, y) < 0.5


def test_mutual_knn_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 6, generator=g), torch.randn(30, 4, generator=g)
    y[:, :2] += x[:, :2]  # partly aligned

    def neighbours(f, i, k):
        f = torch.nn.functional.normalize(f, dim=-1)
        sims = [(float(f[i] @ f[j]), j) for j in range(len(f)) if j != i]
        return {j for _, j in sorted(sims, reverse=True)[:k]}

    expected = sum(len(neighbours(x, i, 5) & neighbours(y, i, 5)) for i in range(30)) / (30 * 5)
    assert mutual_knn(x, y, k=5) == pytest.approx(expected)
    assert mutual_knn(x, x, k=5) == 1.0


def test_ridge_retrieval_finds_a_linear_map_and_not_noise():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 16, generator=g)
    y = x @ torch.randn(16, 12, generator=g)
    assert ridge_retrieval(x, y, alpha=1e-3) > 95.0
    assert ridge_retrieval(x, y[torch.randperm(200, generator=g)], alpha=1e-3) < 10.0


def test_unknown_proxy_named():
    with pytest.raises(ValueError, match="unknown proxy 'cka'"):
        score("cka", torch.zeros(2, 2), torch.zeros(2, 2))


def test_agreement_metrics_by_hand():
    from hnet.eval.ranking import agreement

    truth = {"a": 50.0, "b": 40.0, "c": 30.0, "d": 20.0}
    same = agreement({"a": 0.9, "b": 0.5, "c": 0.2, "d": 0.1}, truth)
    assert same["spearman"] == pytest.approx(1.0) and same["kendall"] == pytest.approx(1.0)
    assert same["top1_hit"] and same["regret"] == 0.0 and same["top3_recall"] == 1.0
    swapped = agreement({"a": 1.0, "b": 2.0, "c": 0.5, "d": 3.0}, truth)  # picks d: 30 points worse
    assert not swapped["top1_hit"] and swapped["regret"] == 30.0
    assert swapped["top3_recall"] == pytest.approx(2 / 3)  # {d, b, a} vs {a, b, c}
    assert swapped["kendall"] == pytest.approx(-1 / 3)  # 2 concordant pairs (a>c, b>c), 4 discordant
