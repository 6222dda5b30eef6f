"""Launching a recipe on a cluster: Slurm detection and the node map (`nodes`), a Ray cluster owned
by PID (`ray_cluster`), and `megarl launch` itself with preemption -> checkpoint -> requeue
(`launcher`). The sbatch scripts in `slurm/` are one call to it."""
