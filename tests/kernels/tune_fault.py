"""A kernel-tuning child with faults injected (tests/kernels/test_tune_process.py):

    python tune_fault.py FAULTS JOB.json

FAULTS: a JSON list of [mode, problem name, candidate label]; mode ``crash`` (the process dies of SIGSEGV when the
candidate runs), ``hang`` (it sleeps), ``lost`` (it raises as a sticky CUDA error does, and the context reads as
broken after it), ``setup`` (it dies making the problem's tensors; label ignored). Otherwise the real child:
``tune_process.main``."""
import json
import os
import signal
import sys
import time

from l4compile.kernels import autotune, tune_process
from l4compile.kernels.tuned_blocks import choice_label

faults, job = json.loads(sys.argv[1]), sys.argv[2]
real_runs = autotune._runs


def fault_of(problem, label):
    return next((mode for mode, name, lab in faults if name == autotune.problem_name(problem.key)
                 and (lab == label or mode == "setup")), None)


def faulty_runs(problem, dtype, tokens, device, g):
    if fault_of(problem, None) == "setup":
        os.kill(os.getpid(), signal.SIGKILL)
    ref, call = real_runs(problem, dtype, tokens, device, g)

    def faulty_call(c):
        mode = fault_of(problem, choice_label(c))
        if mode is None:
            return call(c)

        def fault():
            if mode == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            if mode == "hang":
                time.sleep(3600)
            autotune._context_broken = lambda device: True
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return fault
    return ref, faulty_call


autotune._runs = faulty_runs
if os.environ.get("L4COMPILE_TEST_PIDFILE"):         # where the test that kills the parent finds this process
    with open(os.environ["L4COMPILE_TEST_PIDFILE"], "w") as f:
        f.write(str(os.getpid()))
sys.exit(tune_process.main([job]))
