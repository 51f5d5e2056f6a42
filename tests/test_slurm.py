"""The SLURM profile for real: a tiny study through a single-node Slurm cluster, two GPU jobs
sharing the node, and a job killed at its time limit that resumes when submitted again.

The test starts its own cluster from Debian's slurm-wlm and munge, under tmp_path (only
munged's socket gets a short folder of its own in /tmp): a munge key and munged on its own
socket, a generated slurm.conf (no accounting database, no cgroups, random ports), slurmctld and
slurmd, one node with two fake GPUs in partition `gpu` (the shipped profile's default) and in
partition `cpu` (for light jobs, when the study config names it). Snakemake then submits the
DAG with `--profile workflow/profiles/slurm`, and the tests check both the study's outputs and
where every job ran. The module's tests share one cluster, stopped afterwards, also when a
test fails. The three slow scenarios (the study, the light jobs, the time limit) are started
together and each test checks its own: they mostly wait on SLURM, and take 2 min 40 s side by
side on 2 cores against 5 min 51 s one after another.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from workflow_helpers import BIN, TINY, make_project, write_config

from dnnmod.job_resources import GPU_RULES

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")

# The schema's defaults (720 min, 16 GB) are for real training; the test node is small.
SLURM_TINY = {**TINY, "resources": {"gpu_jobs": {"runtime": 10, "mem_mb": 1000}}}

# The GPU rules are SLURM jobs, the light rules local ones; the tiny study runs at least these
# (the tables and figures it adds as experiments grow are checked the same way).
CORE_RULES = {"prepare_dataset", "split_dataset", "train_base_model", "table_base_models",
              "modularize", "evaluate_modules", "table_modularization", "study_report"}

SLURM_CONF = """\
ClusterName=dnnmodtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
# No cgroups: processes are tracked through /proc, tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No slurmdbd: `sacct` answers "accounting storage is disabled", so job status comes from
# squeue, which shows finished jobs for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
# A job past its time limit gets SIGTERM, then SIGKILL this many seconds later (default 30).
KillWait=5
ReturnToService=2
# Trust the node line below rather than the hardware (any CI machine registers the same node).
# Six CPUs on a 2-core host: the tests' scenarios run side by side and mostly wait.
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs=6 RealMemory=8000 Gres=gpu:2 State=UNKNOWN
PartitionName=gpu Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes={node} MaxTime=INFINITE State=UP
"""

# Slurm drops a GPU without device files; links to /dev/null are character devices it accepts.
GRES_CONF = "AutoDetect=off\nName=gpu File={root}/dev/nvidia[0-1]\n"


def which(tool: str) -> str | None:
    """The tool's path; daemons live in /usr/sbin, which a CI shell's PATH may lack."""
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin",
                                                    "/sbin"]))


def missing_requirements() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged for a test cluster needs root"
    missing = [tool for tool in DAEMONS + CLIENTS if which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed "
                "(apt-get install slurm-wlm munge; .ci/run does this)")
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """A single-node Slurm cluster whose every file lies under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.bin = root / "bin"
        # munged wants every directory above its socket searchable by all (pytest's tmp_path
        # is private), and a Unix socket path has at most 107 bytes: a short folder of its own.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="dnnmod-munge-"))
        self.socket_dir.chmod(0o755)
        self.munge_socket = self.socket_dir / "munge.socket"
        self.munge_key = root / "munge.key"
        self.pids: dict[str, int] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.pathsep.join([str(self.bin), str(BIN), os.environ["PATH"]])}

    def run(self, *args: str, check: bool = True, timeout: float = 30):
        done = subprocess.run(args, env=self.env, timeout=timeout, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}:\n"
                               f"{done.stdout}\n{self.logs()}")
        return done

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)

    def start(self) -> None:
        root = self.root
        for folder in ("state", "spool", "dev", "bin"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.munge_key.write_bytes(os.urandom(1024))
        self.munge_key.chmod(0o400)
        self.run(which("munged"), f"--key-file={self.munge_key}", f"--socket={self.munge_socket}",
                 f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                 f"--seed-file={root / 'munged.seed'}")
        for index in range(2):
            (root / "dev" / f"nvidia{index}").symlink_to("/dev/null")
        (root / "plugstack.conf").write_text("")
        (root / "gres.conf").write_text(GRES_CONF.format(root=root))
        ctld_port = free_port()
        slurmd_port = free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        self.conf.write_text(SLURM_CONF.format(
            node=self.node, root=root, munge_socket=self.munge_socket,
            ctld_port=ctld_port, slurmd_port=slurmd_port))
        # snakemake-executor-plugin-slurm-jobstep clears every SLURM_* variable but the job's
        # identity before its nested `srun`, SLURM_CONF included. A real cluster's srun finds
        # /etc/slurm/slurm.conf (or its controller through DNS); this one must be told again.
        srun = self.bin / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf}\nexport SLURM_CONF\n'
                        f'exec {which("srun")} "$@"\n')
        srun.chmod(0o755)
        self.remember_pid("munged")
        self.run(which("slurmctld"), "-f", str(self.conf))
        self.remember_pid("slurmctld")
        self.run(which("slurmd"), "-f", str(self.conf), "-N", self.node)
        self.remember_pid("slurmd")
        self.wait_until_idle()

    def remember_pid(self, daemon: str, timeout: float = 10) -> None:
        """Reads the daemon's pid file once it is written: slurmd deletes its own when it begins
        to shut down, long before it exits."""
        pid_file = self.root / f"{daemon}.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.pids[daemon] = int(pid_file.read_text().split()[0])
                return
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)

    def wait_until_idle(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            query = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%t", check=False)
            state = query.stdout.strip()
            # one line per partition of the node
            if query.returncode == 0 and set(state.split()) == {"idle"}:
                return
            time.sleep(1)
        raise RuntimeError(f"node {self.node} not idle after {timeout}s (state "
                           f"{state!r})\n{self.logs()}")

    def job(self, job_id: str) -> str:
        return self.run("scontrol", "-o", "show", "job", job_id).stdout

    def stop(self) -> None:
        if "slurmctld" in self.pids:
            queued = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
            if queued:
                self.run("scancel", *queued, check=False, timeout=10)
                # Let slurmd report the cancelled jobs' end while slurmctld still listens.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-t", "PD,R,CG", "-o", "%i", check=False,
                        timeout=10).stdout.strip():
                    time.sleep(0.5)
            # Stops slurmctld and, through it, slurmd.
            self.run("scontrol", "shutdown", check=False, timeout=10)
        # slurmd and slurmctld are given time to finish their shutdown; munged is just ended.
        for daemon, marker, grace in (("slurmd", self.conf, 20), ("slurmctld", self.conf, 15),
                                      ("munged", self.munge_key, 0)):
            if daemon in self.pids:
                self.end(self.pids[daemon], str(marker), grace)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    @staticmethod
    def end(pid: int, marker: str, grace: float) -> None:
        """Ends process `pid` if it is still ours (its command line names this cluster's config
        or key): waits `grace` seconds, then SIGTERM, then SIGKILL."""

        def ours() -> bool:
            try:
                return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                return False

        for sig, wait in ((None, grace), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if sig is not None and ours():
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while ours() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not ours():
                return


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """One cluster for the module's tests: each test's jobs are told apart by their ids."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class SnakemakeThroughSlurm:
    """Snakemake with the shipped SLURM profile on config/tiny.yaml of ``project``, started in
    the background; `result()` waits for it."""

    def __init__(self, cluster: Cluster, project: Path, *targets: str):
        self.cluster = cluster
        self.project = project
        self.pool = project.parent / "gpu-pool"  # a pool the jobs must not use
        self.output = project.parent / "snakemake.out"
        # Command-line additions for the test cluster only; the shipped profile is used as is
        # (its default partition `gpu` exists here):
        #   squeue as status command: without slurmdbd `sacct` fails, and the plugin picks
        #     sacct whenever the binary is installed;
        #   a 2 s first status check instead of 40 s, so the test takes minutes, not ten;
        #   no account: this cluster has none (and no sacctmgr to guess one from);
        #   keep the SLURM logs of successful jobs, to check them.
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [str(BIN / "snakemake"), "--profile", "workflow/profiles/slurm",
                 "--configfile", "config/tiny.yaml",
                 "--slurm-status-command", "squeue",
                 "--slurm-init-seconds-before-status-checks", "2",
                 "--slurm-no-account", "--slurm-keep-successful-logs", *targets],
                cwd=project, env={**cluster.env, "DNNMOD_GPU_POOL": str(self.pool)},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def result(self) -> tuple[str, dict[str, tuple[str, Path]], set[str], set[str]]:
        """Snakemake's output, rule -> (SLURM job id, log) of the submitted jobs, and the rules
        run as submitted jobs and as local ones."""
        returncode = self.process.wait(timeout=900)
        output = self.output.read_text()
        assert returncode == 0, output[-4000:] + "\n" + self.cluster.logs()
        submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)", output)
        jobs = {re.search(r"/rule_(\w+)/", log).group(1): (job_id, Path(log))
                for job_id, log in submitted}
        ran = set(re.findall(r"^rule (\w+):$", output, flags=re.MULTILINE))
        local = set(re.findall(r"^localrule (\w+):$", output, flags=re.MULTILINE))
        assert set(jobs) == ran, output[-4000:]
        assert len({job_id for job_id, _ in jobs.values()}) == len(ran)
        return output, jobs, ran, local

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class TrainingPastItsTimeLimit:
    """A training far longer than its 1-minute limit, submitted as a plain sbatch job: SLURM
    ends it (SIGTERM, SIGKILL after KillWait), and the same script submitted again continues
    after the last saved epoch."""

    def __init__(self, cluster: Cluster, root: Path, data_root: Path):
        self.cluster = cluster
        self.checkpoint = root / "resume" / "model.pt"
        self.script = root / "train.sh"
        self.script.write_text(
            "#!/bin/sh\n"
            # niced: it only has to train some epochs before its limit, and yields the CPU to
            # the jobs of the scenarios running beside it
            f"exec nice -n 19 {BIN / 'dnnmod'} train --dataset digits --arch simcnn --width 0.0625 "
            "--options '{}' --recipe '{\"epochs\": 100000, \"batch_size\": 64, \"lr\": 0.05}' "
            f"--seed 0 --data-root {data_root} --threads 1 --device cpu "
            f"--checkpoint {self.checkpoint} --out {root}/model.safetensors\n")
        self.first_log, self.second_log = root / "first.log", root / "second.log"
        self.started = time.monotonic()
        self.first = self.submit(1, self.first_log)

    def submit(self, limit_minutes: int, log: Path) -> str:
        return subprocess.run(
            ["sbatch", "--parsable", f"--time={limit_minutes}", f"--output={log}",
             str(self.script)], env=self.cluster.env, check=True, text=True,
            stdout=subprocess.PIPE).stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def slow_runs(slurm_cluster, tmp_path_factory, data_root):
    """The three slow scenarios, started together: each spends nearly all its time waiting on
    SLURM (the plugin's status polls, which back off by 10 s per unfinished check; the
    1-minute minimum time limit), not computing, so side by side they take about the longest
    one's time instead of the sum of all three (5 min 51 s one after another). The node
    declares more CPUs than the host has, so that the scenarios' 1-CPU jobs do not queue
    behind each other; each test checks its own scenario's jobs."""
    study = make_project(tmp_path_factory.mktemp("study") / "project")
    write_config(study, SLURM_TINY)
    # E1 of the tiny study: the data preparation, the split and the table are light jobs,
    # submitted to partition `cpu` without a GPU; the training goes to `gpu` with one.
    light = make_project(tmp_path_factory.mktemp("light") / "project")
    write_config(light, {**SLURM_TINY, "resources": {
        **SLURM_TINY["resources"], "light": {"partition": "cpu", "runtime": 5, "mem_mb": 500}}})
    runs = {"training": TrainingPastItsTimeLimit(slurm_cluster, tmp_path_factory.mktemp("tl"),
                                                 data_root),
            "study": SnakemakeThroughSlurm(slurm_cluster, study),
            "light": SnakemakeThroughSlurm(slurm_cluster, light,
                                           "results/tiny/tables/e1_base_models.csv")}
    try:
        yield runs
    finally:
        for run in (runs["study"], runs["light"]):
            run.stop()


def wait_for_state(cluster: Cluster, job_id: str, states: tuple[str, ...],
                   timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job_id)
        state = re.search(r"JobState=(\w+)", info).group(1)
        if state in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s:\n{info}\n"
                         f"{cluster.logs()}")


# Both jobs claim a device, then wait until the other one holds its own.
BOTH_HOLD_A_GPU = """\
import os, sys, time
from pathlib import Path
from dnnmod.devices import select_device
claim = select_device("auto")
shared = Path(sys.argv[1])
gpus = os.environ["SLURM_JOB_GPUS"]
(shared / (os.environ["SLURM_JOB_ID"] + ".held")).write_text(f"{claim.physical_id} {gpus}")
deadline = time.monotonic() + 60
while len(list(shared.glob("*.held"))) < 2:
    if time.monotonic() > deadline:
        sys.exit("the other job never held its GPU at the same time")
    time.sleep(0.2)
"""


def test_two_gpu_jobs_on_one_node_both_see_gpu0_and_run_at_once(slurm_cluster, tmp_path):
    # First in the module, on the idle cluster: the node's two GPUs must both be free.
    assert not slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip()
    shared = tmp_path / "held"
    shared.mkdir()
    program = tmp_path / "hold_a_gpu.py"
    program.write_text(BOTH_HOLD_A_GPU)
    # A node that confines each job to its GPU (cgroups) shows every 1-GPU job its GPU as
    # device 0; this test node has no cgroups, so the job says it itself.
    command = f"CUDA_VISIBLE_DEVICES=0 exec {sys.executable} {program} {shared}"
    pool = tmp_path / "gpu-pool"  # a pool both jobs would share, were it used
    env = {**slurm_cluster.env, "DNNMOD_SIMULATE_GPUS": "1", "DNNMOD_GPU_POOL": str(pool)}
    started = time.monotonic()
    job_ids = [subprocess.run(
        ["sbatch", "--parsable", "--gpus=1", "--time=2", f"--output={tmp_path}/job{n}.out",
         "--wrap", command], env=env, check=True, text=True, stdout=subprocess.PIPE,
    ).stdout.strip().split(";")[0] for n in range(2)]
    for job_id in job_ids:
        info = wait_for_state(slurm_cluster, job_id, ("COMPLETED", "FAILED", "TIMEOUT"), 120)
        assert "JobState=COMPLETED" in info, info + (tmp_path / "job0.out").read_text()
    held = sorted((shared / f"{job_id}.held").read_text() for job_id in job_ids)
    # Each saw device 0; SLURM had given them different GPUs of the node; no pool was touched.
    assert held == ["0 0", "0 1"], held
    assert not pool.exists()
    print(f"two GPU jobs side by side: {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_tiny_study_runs_through_slurm(slurm_cluster, slow_runs):
    run = slow_runs["study"]
    output, jobs, ran, local = run.result()
    project = run.project

    # The study's outputs, as in a local run.
    model = json.loads((project / "results/tiny/models/digits/simcnn/st/seed0/model.json")
                       .read_text())
    assert model["arch"] == "simcnn"
    assert len(model["history"]) == SLURM_TINY["recipes"]["tiny"]["epochs"]
    modules = project / "results/tiny/modules/digits/simcnn/gradsplitter/seed0"
    metrics = json.loads((modules / "metrics.json").read_text())
    assert 0 < metrics["krr"] <= 1 and len(metrics["modules"]) == 10
    e1 = (project / "results/tiny/tables/e1_base_models.csv").read_text().splitlines()
    e2 = (project / "results/tiny/tables/e2_modularization.csv").read_text().splitlines()
    assert len(e1) == 2 and len(e2) == 3

    # Every GPU job went through sbatch, every light job ran on this host.
    assert ran == CORE_RULES & set(GPU_RULES), output[-4000:]
    assert local >= (CORE_RULES - ran) | {"all"}, output[-4000:]
    for rule, (job_id, log) in jobs.items():
        info = slurm_cluster.job(job_id)
        assert "JobState=COMPLETED" in info, info
        assert "Partition=gpu" in info, info
        assert log.is_file() and f"rule {rule}:" in log.read_text(), log
        # `gpu: 1` became a GPU request that the node's gres satisfied; the job used the GPU
        # that SLURM assigned, without the host's slot pool.
        assert "gpu:1" in info, info
        # resources.gpu_jobs of the config became the job's time limit (10 min).
        assert "TimeLimit=00:10:00" in info, info
    assert not run.pool.exists()


@pytest.mark.slow
def test_light_jobs_go_to_the_configured_cpu_partition(slurm_cluster, slow_runs):
    run = slow_runs["light"]
    output, jobs, ran, local = run.result()
    assert ran == {"prepare_dataset", "split_dataset", "train_base_model",
                   "table_base_models"}, output[-4000:]
    assert not local, output[-4000:]  # nothing ran on the submitting host
    for rule, (job_id, log) in jobs.items():
        info = slurm_cluster.job(job_id)
        assert "JobState=COMPLETED" in info, info
        assert log.is_file() and f"rule {rule}:" in log.read_text(), log
        if rule in GPU_RULES:
            assert "Partition=gpu" in info and "gpu:1" in info, info
            assert "TimeLimit=00:10:00" in info, info
        else:
            # resources.light: its partition, wall time and memory, no GPU
            assert "Partition=cpu" in info and "gpu" not in info.replace("Partition=gpu", ""), info
            assert "TimeLimit=00:05:00" in info and "MinMemoryNode=500M" in info, info
    assert len((run.project / "results/tiny/tables/e1_base_models.csv").read_text()
               .splitlines()) == 2


@pytest.mark.slow
def test_a_job_killed_at_its_time_limit_resumes_from_its_checkpoint(slurm_cluster, slow_runs):
    training = slow_runs["training"]
    first_log, second_log = training.first_log, training.second_log
    info = wait_for_state(slurm_cluster, training.first, ("TIMEOUT", "COMPLETED", "FAILED"), 180)
    assert "JobState=TIMEOUT" in info, info + first_log.read_text()[-2000:]
    done = [int(n) for n in re.findall(r"epoch (\d+)/100000", first_log.read_text())]
    assert done and training.checkpoint.is_file(), first_log.read_text()[-2000:]
    killed_after = time.monotonic() - training.started

    second = training.submit(5, second_log)
    deadline = time.monotonic() + 120
    resumed = None
    while time.monotonic() < deadline:
        text = second_log.read_text() if second_log.exists() else ""
        resumed = re.search(rf"train: resuming from {training.checkpoint} after epoch (\d+)",
                            text)
        if resumed and f"epoch {int(resumed.group(1)) + 1}/100000" in text:
            break
        time.sleep(1)
    slurm_cluster.run("scancel", second)
    assert resumed, second_log.read_text()[-2000:]
    # It continued from the last epoch the killed job saved (the one it logged, or one later
    # if SIGTERM came between saving and logging), not from scratch.
    assert int(resumed.group(1)) in (done[-1], done[-1] + 1), (done, resumed.group(0))
    assert "epoch 1/100000" not in second_log.read_text()
    print(f"killed at the time limit after {killed_after:.0f} s ({done[-1]} epochs), resumed "
          f"and trained on; {time.monotonic() - training.started:.0f} s in all")
