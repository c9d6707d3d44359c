"""Small helpers shared by the tests."""
from collections.abc import Callable

import torch


def exit_code(main: Callable[[list[str]], None], args) -> int:
    """Run a command's ``main`` in-process with ``args`` (any objects, passed as strings);
    its exit code, 0 when it returns normally."""
    try:
        main([str(arg) for arg in args])
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code
    return 0


def randomize_(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values: zero-initialised GRN or biases would hide bugs."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)
    return module


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """Max abs difference within ``rtol`` of the expected tensor's largest magnitude."""
    scale = expected.abs().max().clamp(min=1.0)
    diff = (actual - expected).abs().max()
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} > {rtol:g} * {scale:.3g}"


def assert_no_leakage(model, imgs: torch.Tensor, mask: torch.Tensor) -> None:
    """FCMAE ``model``: the latent is zero at removed patches, and changing the pixels of removed
    patches changes neither the latent nor the prediction, while changing visible pixels does."""
    patch = model.patch_size
    grid = (imgs.shape[2] // patch, imgs.shape[3] // patch)
    latent = model.encoder(imgs, mask)
    _, pred, _ = model(imgs, mask=mask)
    removed = mask.reshape(mask.shape[0], 1, *grid).bool()
    assert bool((latent.masked_select(removed) == 0).all())
    pixel_removed = removed.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    altered = torch.where(pixel_removed, torch.randn_like(imgs) * 10, imgs)
    assert torch.equal(model.encoder(altered, mask), latent)
    assert torch.equal(model(altered, mask=mask)[1], pred)
    visible_changed = torch.where(pixel_removed, imgs, imgs + 1.0)
    assert not torch.allclose(model.encoder(visible_changed, mask), latent)


def assert_param_count(name: str, expected_millions: float, tolerance: float = 0.01) -> None:
    """The dense model ``name`` (built on the meta device, no memory) has within ``tolerance``
    (relative) of ``expected_millions`` parameters."""
    import fcmae
    with torch.device("meta"):
        model = fcmae.create_model(name)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params_m - expected_millions) / expected_millions < tolerance, f"{name}: {params_m:.2f}M"


def interrupt_at_epoch(monkeypatch, stop_epoch, error=KeyboardInterrupt):
    """Make the run die when ``stop_epoch`` starts, as a killed job would."""
    import fcmae.engine
    real = fcmae.engine.train_one_epoch

    def wrapped(*args, **kwargs):
        if args[6] == stop_epoch:
            raise error("simulated failure")
        return real(*args, **kwargs)
    monkeypatch.setattr(fcmae.engine, "train_one_epoch", wrapped)


def free_port() -> int:
    """A TCP port nobody listens on right now (for torchrun's rendezvous in tests)."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sparse_and_dense_results(encoder, dense, name: str, imgs: torch.Tensor, mask: torch.Tensor,
                             dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """Output (key ``"out"``) and every body gradient (dense key layout) of the sparse
    ``encoder`` and the masked-dense ``dense`` model, under autocast to ``dtype`` (None: fp32),
    the same random weighting of the output for both."""
    from fcmae.convert import encoder_to_dense
    results = []
    weights = None
    for model, forward in ((encoder, encoder), (dense, dense.forward_features)):
        model.zero_grad(set_to_none=True)
        with torch.autocast(imgs.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = forward(imgs, mask).float()
        if weights is None:
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
        (out * weights).sum().backward()
        grads = {key: param.grad.float() for key, param in model.named_parameters() if param.grad is not None}
        results.append({"out": out.detach(), **grads})
    sparse, dense_results = results
    sparse = {"out": sparse.pop("out"), **encoder_to_dense(sparse, name)}
    return sparse, {key: value for key, value in dense_results.items() if key in sparse}


def assert_within_dtype_error(actual: dict, same_dtype_reference: dict, fp32_reference: dict,
                              factor: float = 6.0) -> None:
    """Low-precision results compared by what that precision costs: for every tensor, the L2
    error of ``actual`` against ``fp32_reference`` is at most ``factor`` times the L2 error of
    ``same_dtype_reference`` (the dense model in the same dtype: the measured cost of the
    dtype itself), plus 1e-5 of the reference's norm. Measured on CPU bf16 (ConvNeXt V1/V2
    atto, 5 seeds, output and every gradient): the ratio reached 3.6 (V2's stage-0 and
    first-downsample gradients, behind GRN), hence 6."""
    for key, reference in fp32_reference.items():
        error = (actual[key] - reference).norm()
        budget = factor * (same_dtype_reference[key] - reference).norm() + 1e-5 * reference.norm()
        assert error <= budget, f"{key}: L2 error {error:.3g} > {factor:g} × the dtype's own error ({budget:.3g})"


def rectangles(count: int, size: int = 128, seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images (3, size, size) with one red (label 1) or blue (label 2) rectangle on grey noise,
    and torchvision detection targets: its box (1, 4), label (1,) and mask (1, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for index in range(count):
        image = 0.5 + 0.05 * torch.randn(3, size, size, generator=generator)
        x0, y0 = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        width, height = torch.randint(size // 4, size // 2, (2,), generator=generator).tolist()
        label = 1 + index % 2
        colour = torch.tensor([1.0, 0.0, 0.0] if label == 1 else [0.0, 0.0, 1.0])
        image[:, y0:y0 + height, x0:x0 + width] = colour[:, None, None]
        mask = torch.zeros(1, size, size, dtype=torch.uint8)
        mask[:, y0:y0 + height, x0:x0 + width] = 1
        images.append(image.clamp(0, 1))
        targets.append(dict(boxes=torch.tensor([[x0, y0, x0 + width, y0 + height]], dtype=torch.float32),
                            labels=torch.tensor([label]), masks=mask))
    return images, targets
