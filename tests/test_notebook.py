"""notebooks/explore_guidance.ipynb: stored without outputs, and runs top to bottom on tiny runs."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import nbformat
import torch
from diffusers import DDPMPipeline

from gradcheck import runner
from gradcheck.config import RunConfig
from gradcheck.models import (
    classifier_config,
    make_classifier,
    make_scheduler,
    make_unet,
    save_classifier,
)

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore_guidance.ipynb"


def _kernel_name() -> str:
    """The installed python3 kernel, or one registered for this interpreter (fresh CI machine)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        # jupyter_client runs a spec whose argv starts with "python" on sys.executable.
        if spec.argv[0] in ("python", "python3", sys.executable):
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(user=True, kernel_name="gradcheck-test", display_name="gradcheck test")
    return "gradcheck-test"


def test_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_notebook_executes_on_two_tiny_runs(tmp_path: Path, tiny_data: Path) -> None:
    from nbclient import NotebookClient

    torch.manual_seed(0)
    DDPMPipeline(unet=make_unet("tiny"), scheduler=make_scheduler()).save_pretrained(
        tmp_path / "ddpm", safe_serialization=True)
    save_classifier(make_classifier(), tmp_path / "clf",
                    classifier_config("nonrobust", "mobilenet_v3_small"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = RunConfig(classifier=str(tmp_path / "clf"), num_samples=2, batch_size=2,
                         steps=10, device="cpu", ddpm=str(tmp_path / "ddpm"),
                         data_root=str(tiny_data), metrics=False, cos_oracle=False)
        run_a = runner.run(base, out=tmp_path / "runs", progress=False)
        run_b = runner.run(dataclasses.replace(base, x0_estimate=True, stabilizer="adam"),
                           out=tmp_path / "runs", progress=False)
    finally:
        torch.set_num_threads(threads)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = f"RUN = {str(run_a)!r}\nRUN_B = {str(run_b)!r}\nSAMPLE = 1\n"
    NotebookClient(nb, timeout=180, kernel_name=_kernel_name(),
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert not any(o.output_type == "error" for o in outputs)
    assert run_a.name in text and run_b.name in text  # loaded RUN, compared with RUN_B
    assert "cos_to_previous_recorded" in text  # the trajectory came from vectors.safetensors
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= 4  # cosines, norms, trajectory, comparison
