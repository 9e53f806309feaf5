"""Distillation building blocks shared by the `ode` and `self-forcing` stages.

`dmd` (pure losses), `roles` (teacher/student/critic from config entries, export),
`trajectories` (teacher ODE trajectories, the Ray teacher-scoring actor pool, trajectory shards),
`real_score` (Self-Forcing's DMD real score served by named teacher actors), `rollout` (the
student's whole-clip rollout and DMD noise levels for Self-Forcing).
The stages themselves live in `pipeline.stages.ode` / `pipeline.stages.self_forcing`; nothing here
runs a training loop.
"""
