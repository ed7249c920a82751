"""A real Orthanc PACS (Debian packages ``orthanc`` and ``orthanc-dicomweb``) for the tests: free loopback ports, a
temporary storage folder, a health wait and a clean stop. ``scripts/install_test_services.sh`` (in the README's test
command) installs it; a machine without it fails these tests with that hint instead of skipping them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from serve.triton_server import free_port

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
INSTALL_HINT = "run scripts/install_test_services.sh (part of the README's test command) to install Orthanc"


class Orthanc:
    """One Orthanc process with the DICOMweb plugin; ``dicomweb`` is the DICOMweb root URL (``.../dicom-web``)."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("Orthanc")
        if binary is None:
            raise RuntimeError(f"the Orthanc binary is not on PATH; {INSTALL_HINT}")
        plugins = next((d for d in PLUGIN_DIRS if Path(d, "libOrthancDicomWeb.so").is_file()), None)
        if plugins is None:
            raise RuntimeError(f"the Orthanc DICOMweb plugin (libOrthancDicomWeb.so) is missing; {INSTALL_HINT}")
        self.http_port, self.dicom_port = free_port(), free_port()
        self.folder = folder
        config = {
            "Name": "MEDOPS-TEST", "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomServerEnabled": False, "Plugins": [str(Path(plugins, "libOrthancDicomWeb.so"))],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
            "StableAge": 1, "ConcurrentJobs": 1, "HttpThreadsCount": 8,
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))
        self.log = folder / "orthanc.log"
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"

    def start(self, timeout: float = 60) -> None:
        """Start and wait until ``/system`` and the DICOMweb root answer; the log tail is in the error otherwise."""
        with self.log.open("w") as fh:
            self.process = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(self.config)], stdout=fh,
                                            stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok and \
                        requests.get(f"{self.dicomweb}/studies", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        tail = self.log.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"Orthanc did not become healthy within {timeout:.0f} s; log tail:\n{tail}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 20 s; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def store(self, files: list[Path]) -> list[str]:
        """Upload DICOM files through Orthanc's REST API (not the code under test); their Orthanc ids."""
        ids = []
        for path in files:
            reply = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
            reply.raise_for_status()
            ids.append(reply.json()["ID"])
        return ids

    def clear(self) -> None:
        """Delete every patient (and so every study) stored so far."""
        for patient in requests.get(f"{self.url}/patients", timeout=10).json():
            requests.delete(f"{self.url}/patients/{patient}", timeout=30).raise_for_status()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc for the session (fails, does not skip, when Orthanc is not installed)."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        code = server.stop()
        assert server.process is not None and server.process.poll() is not None, "Orthanc left running"
        assert code is not None, os.fspath(server.log)
