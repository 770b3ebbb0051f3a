"""The backbone's rotary attention: the complex-multiply form equals the pairwise rotation it replaces."""
import torch

from models.backbone import apply_rotary, rotary_tables


def _pairwise(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def test_rotary_complex_form_equals_the_pairwise_rotation():
    torch.manual_seed(0)
    B, L, nh, hd = 2, 17, 3, 8
    qkv = torch.randn(B, L, 3 * nh * hd, requires_grad=True)
    q, k, _ = qkv.view(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4)  # non-contiguous views, as in Attention
    cos, sin = rotary_tables(L, hd, 10000.0, "cpu")
    out = apply_rotary(k, cos, sin)
    torch.testing.assert_close(out, _pairwise(k, cos, sin), rtol=1e-6, atol=1e-6)  # same products (fp32 rounding)
    assert torch.allclose(out.view(B, nh, L, hd // 2, 2).norm(dim=-1), k.view(B, nh, L, hd // 2, 2).norm(dim=-1),
                          atol=1e-5)  # a rotation of every pair
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad((apply_rotary(q, cos, sin) * g).sum(), qkv)
    (ref,) = torch.autograd.grad((_pairwise(q, cos, sin) * g).sum(), qkv)
    torch.testing.assert_close(grad, ref)
    half = apply_rotary(k.detach().bfloat16(), cos.bfloat16(), sin.bfloat16())  # other dtypes: the pairwise form
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), out.detach(), rtol=2e-2, atol=2e-2)
