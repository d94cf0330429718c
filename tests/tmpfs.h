// A tmpfs mounted with a size over a directory, for full-disk tests (mounting needs root: callers skip when
// mounted() is false). Unmounted at destruction.
#ifndef RAPIDIN_TESTS_TMPFS_H_
#define RAPIDIN_TESTS_TMPFS_H_

#include <sys/mount.h>

#include <string>

namespace rapidin::testing {

class Tmpfs {
 public:
  Tmpfs(const std::string& path, const char* size) : path_(path) {
    mounted_ = mount("tmpfs", path.c_str(), "tmpfs", 0, (std::string("size=") + size).c_str()) == 0;
  }
  ~Tmpfs() {
    if (mounted_) umount2(path_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }
  bool Resize(const char* size) {
    return mount("tmpfs", path_.c_str(), "tmpfs", MS_REMOUNT, (std::string("size=") + size).c_str()) == 0;
  }

 private:
  std::string path_;
  bool mounted_ = false;
};

}  // namespace rapidin::testing

#endif  // RAPIDIN_TESTS_TMPFS_H_
