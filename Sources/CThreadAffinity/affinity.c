// CPU affinity of threads. `sched_getaffinity` / `sched_setaffinity` and the CPU_SET macros are GNU
// extensions, which Swift's Glibc module does not export; hence this small C target.
#define _GNU_SOURCE
#include "CThreadAffinity.h"

#include <errno.h>

#ifdef __linux__
#include <sched.h>
#include <unistd.h>

static int list_cpus(pid_t who, int *cpus, int capacity) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(who, sizeof(set), &set) != 0) {
        return -1;
    }
    int count = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && count < capacity; cpu++) {
        if (CPU_ISSET(cpu, &set)) {
            cpus[count++] = cpu;
        }
    }
    return count;
}

int token_gateway_allowed_cpus(int *cpus, int capacity) {
    // The main thread's id is the process id.
    return list_cpus(getpid(), cpus, capacity);
}

int token_gateway_thread_cpus(int *cpus, int capacity) {
    return list_cpus(0, cpus, capacity);
}

int token_gateway_pin_thread(int cpu) {
    if (cpu < 0 || cpu >= CPU_SETSIZE) {
        return EINVAL;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set) == 0 ? 0 : errno;
}

#else

int token_gateway_allowed_cpus(int *cpus, int capacity) {
    (void)cpus;
    (void)capacity;
    errno = ENOSYS;
    return -1;
}

int token_gateway_thread_cpus(int *cpus, int capacity) {
    (void)cpus;
    (void)capacity;
    errno = ENOSYS;
    return -1;
}

int token_gateway_pin_thread(int cpu) {
    (void)cpu;
    return ENOSYS;
}

#endif
