"""The layout of ranks into pipeline x data x tensor groups, and the Horovod process sets made for
it at start-up: from MPI sub-communicators under mpirun, from rank lists under Gloo."""
import re
import subprocess
import sys

import pytest

from app.mesh import Mesh
from conftest import ROOT, job_env, last_json_line, run_job, run_worker, tiny_train_args


def test_tensor_groups_are_consecutive_ranks_and_pipeline_stages_the_farthest_apart():
    mesh = Mesh(world=8, tensor=2, pipeline=2)
    assert mesh.data == 2
    assert mesh.groups("tensor") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mesh.groups("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert mesh.groups("pipeline") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert mesh.coordinates(5) == {"tensor": 1, "data": 0, "pipeline": 1}
    assert all(mesh.rank_at(**mesh.coordinates(r)) == r for r in range(8))


def test_a_world_the_layout_does_not_divide_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="launch a multiple of 4 ranks"):
        Mesh(world=6, tensor=2, pipeline=2)


def test_importing_dist_loads_neither_the_layouts_nor_transformers():
    # dist reads the mesh; were the mesh inside app.parallel, importing dist would run every
    # layout, each importing dist back, and pull in transformers with them.
    probe = ("import app.dist, sys; "
             "print(sorted(m for m in sys.modules if m == 'transformers' or m.startswith('app.parallel')))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                            check=True)
    assert result.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_each_rank_reduces_over_its_own_tensor_and_data_groups(launcher):
    result = last_json_line(run_worker("mesh_sets.py", [2, 1], np_=4, launcher=launcher).stdout)
    assert result["controller"] == launcher
    by_rank = {row["rank"]: row for row in result["rows"]}
    # tensor groups {0,1} {2,3}; data groups {0,2} {1,3}; one pipeline stage per rank
    assert [by_rank[r]["sums"] for r in range(4)] == [
        {"tensor": 1.0, "data": 2.0, "pipeline": 0.0}, {"tensor": 1.0, "data": 4.0, "pipeline": 1.0},
        {"tensor": 5.0, "data": 2.0, "pipeline": 2.0}, {"tensor": 5.0, "data": 4.0, "pipeline": 3.0}]
    assert [by_rank[r]["tensor"] for r in range(4)] == [0, 1, 0, 1]
    # MPI sub-communicators exist only where MPI launched the job (pipelines send over them).
    assert all(row["mpi_communicators"]["tensor"] is (launcher == "mpi") for row in result["rows"])


def test_a_layout_the_world_size_cannot_take_fails_on_every_rank_in_one_line(tiny_data, tmp_path):
    result = run_job(tiny_train_args(tiny_data, tmp_path / "run", "parallel.tensor=3"), check=False, timeout=120)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("cannot be split into pipeline 1 x tensor 3 groups") == 2
    assert not re.search(r"\[\d+\]<std\w+>:Traceback", result.stdout + result.stderr)  # none from a rank
