"""The crash tests' fork server: imports the program once, forks a child per run."""

# A "zygote" process imports the program once and forks one child per run, so
# six runs do not pay six interpreter start-ups. Each child is a separate
# process running the command line (acq.cli's typer app, as `python -m
# acq.cli run ...` would) and is killed with SIGKILL like any other; the first
# run is a genuine `python -m acq.cli` subprocess.
PRELOAD = r"""
import os, sys, json
import acq.cli, acq.engine, acq.writers, common.crashpoints, devices.factory, devices.sim.wafer
import serial.urlhandler.protocol_socket as ps
ps.time = type("NoSleep", (), {"sleep": staticmethod(lambda s: None)})   # as fast_socket_close
for name in ("acq.writers.ome_tiff", "acq.writers.ome_zarr", "acq.writers.mipmaps", "acq.writers.tilespecs",
             "acq.writers.trakem2", "acq.verify", "common.crashpoints", "scipy.integrate"):
    __import__(name)
print("ready", flush=True)
"""
ZYGOTE = PRELOAD + r"""
for line in sys.stdin:
    args = json.loads(line)
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        fd = os.open(args.pop(0), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        sys.argv = ["acq.cli"] + args
        try:
            acq.cli.app()
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
