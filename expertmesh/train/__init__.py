"""The training loop: the loop (`loop.run`), the step and the pipelined step, the metrics window,
preemption control and the wiring of data, optimizer and DiLoCo. Started by expertmesh/launch/train.py."""
