"""A fork server for the tests that kill runs (test_resume, test_crash_points).

It imports the program once and forks one child per run, so dozens of runs
do not pay dozens of interpreter start-ups. Each child is a separate process
running the command line (acq.cli's typer app, as ``python -m acq.cli ...``
would), optionally with a crash point set (common/crashpoints.py), and can
be killed like any other. Protocol: one JSON object per line on stdin,
``{"log": path, "argv": [...], "crash": [at, ops_log, root] or null}``; the
server answers the child's pid, then its exit code, one line each.
"""

SERVER = r"""
import os, sys, json
import acq.cli, acq.engine, acq.writers, common.crashpoints, devices.factory, devices.sim.wafer
import serial.urlhandler.protocol_socket as ps
ps.time = type("NoSleep", (), {"sleep": staticmethod(lambda s: None)})   # as fast_socket_close
for name in ("acq.writers.ome_tiff", "acq.writers.ome_zarr", "acq.writers.mipmaps", "acq.writers.tilespecs",
             "acq.writers.trakem2", "acq.verify", "scipy.integrate"):
    __import__(name)
print("ready", flush=True)
for line in sys.stdin:
    a = json.loads(line)
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        fd = os.open(a["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        if a.get("crash"):
            common.crashpoints.configure(*a["crash"])
        sys.argv = ["acq.cli"] + a["argv"]
        code = 0
        try:
            acq.cli.app()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:                  # never let a child fall back into the server loop
            import traceback; traceback.print_exc(); code = 3
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
