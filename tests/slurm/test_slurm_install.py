"""Installing Slurm for the tests is one install at a time on a machine: the suite runs in several pytest-xdist
workers, and two of them running apt-get side by side would fail on apt's lock, skipping that worker's Slurm
tests with "no Slurm". (No install happens here: apt and the installed check are stood in for.)"""

import fcntl
import threading
import time

from megatron_avar.testing import slurm


def test_a_second_installer_waits_for_the_first_and_finds_slurm_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm.tempfile, "gettempdir", lambda: str(tmp_path))
    installed, installs, overlapping = [False], [], []

    def apt_install(timeout_s):
        with open(tmp_path / "avar-slurm-install.lock") as probe:  # held by the installer while it installs
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                overlapping.append(True)  # nobody held it: another install could run alongside
            except BlockingIOError:
                pass
        installs.append(threading.current_thread().name)
        time.sleep(0.2)
        installed[0] = True

    monkeypatch.setattr(slurm, "_slurm_installed", lambda: installed[0])
    monkeypatch.setattr(slurm, "_apt_install", apt_install)
    workers = [threading.Thread(target=slurm.ensure_slurm_installed, name=f"gw{i}") for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(installs) == 1 and overlapping == []
