// A process's resident memory, open file descriptors and threads, from /proc (the soak and the fault runs).
#ifndef RAPIDIN_BENCH_PROC_STATS_H_
#define RAPIDIN_BENCH_PROC_STATS_H_

#include <dirent.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace rapidin::bench {

struct ProcState {
  double rss_mb = 0;
  int fds = 0;
  int threads = 0;
};

// Zeros for pid <= 0 or a process that is gone.
inline ProcState ReadProc(int pid) {
  ProcState s;
  if (pid <= 0) return s;
  std::ifstream st("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(st, line)) {
    if (line.rfind("VmRSS:", 0) == 0) s.rss_mb = std::atof(line.c_str() + 6) / 1024.0;
    if (line.rfind("Threads:", 0) == 0) s.threads = std::atoi(line.c_str() + 8);
  }
  if (DIR* d = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str())) {
    while (dirent* e = readdir(d)) s.fds += e->d_name[0] != '.';
    closedir(d);
  }
  return s;
}

}  // namespace rapidin::bench

#endif  // RAPIDIN_BENCH_PROC_STATS_H_
