"""Run under horovodrun -np 2: rank 1 joins an allreduce LATE_S seconds after rank 0, which waits in
Horovod's synchronize(); rank 0 prints the CPU seconds its process spent over that wait."""
import json
import sys
import time

import horovod.torch as hvd
import torch

late_s = float(sys.argv[1])
hvd.init()
hvd.allreduce(torch.ones(1), name="together")  # both ranks started
if hvd.rank() == 1:
    time.sleep(late_s)
cpu, wall = time.process_time(), time.perf_counter()
total = hvd.allreduce(torch.ones(1), op=hvd.Sum, name="late")
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
if hvd.rank() == 0:
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "sum": total.item()}))
