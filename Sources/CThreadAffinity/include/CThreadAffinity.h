#ifndef TOKEN_GATEWAY_C_THREAD_AFFINITY_H
#define TOKEN_GATEWAY_C_THREAD_AFFINITY_H

/// The CPUs the process may run on (the main thread's affinity mask: what `taskset` or a
/// container's cpuset allows), in increasing order, written to `cpus`. Returns how many were
/// written (at most `capacity`), or -1 with `errno` set (ENOSYS where the system has no
/// affinity masks).
int token_gateway_allowed_cpus(int *cpus, int capacity);

/// The CPUs the calling thread may run on, as `token_gateway_allowed_cpus`.
int token_gateway_thread_cpus(int *cpus, int capacity);

/// Restricts the calling thread to `cpu`. Returns 0, or an errno value.
int token_gateway_pin_thread(int cpu);

#endif
