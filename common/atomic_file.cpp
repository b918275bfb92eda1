#include "common/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <random>
#include <sstream>

#include "common/error.h"

namespace attnpilot {
namespace fs = std::filesystem;

namespace {

/// RAII file descriptor.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }

 private:
  int fd_;
};

void write_all(int fd, std::string_view bytes, const fs::path& path) {
  const char* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno(fmt::format("writing {}", path.string()));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

std::string temp_suffix() {
  std::random_device rd;
  return fmt::format(".tmp.{}.{:08x}", static_cast<long>(::getpid()), rd());
}

}  // namespace

void fsync_directory(const fs::path& dir) {
  Fd fd(::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY));
  if (fd.get() < 0) throw_errno(fmt::format("opening directory {}", dir.string()));
  if (::fsync(fd.get()) != 0) throw_errno(fmt::format("fsync of directory {}", dir.string()));
}

void write_file_atomic(const fs::path& path, std::string_view bytes) {
  const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  const fs::path tmp = dir / (path.filename().string() + temp_suffix());
  {
    Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (fd.get() < 0) throw_errno(fmt::format("creating {}", tmp.string()));
    try {
      write_all(fd.get(), bytes, tmp);
      if (::fsync(fd.get()) != 0) throw_errno(fmt::format("fsync of {}", tmp.string()));
    } catch (...) {
      ::unlink(tmp.c_str());
      throw;
    }
    if (::close(fd.release()) != 0) {
      ::unlink(tmp.c_str());
      throw_errno(fmt::format("closing {}", tmp.string()));
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw_errno(fmt::format("renaming {} to {}", tmp.string(), path.string()));
  }
  fsync_directory(dir);
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(fmt::format("cannot open {} for reading", path.string()));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw IoError(fmt::format("error reading {}", path.string()));
  return ss.str();
}

void replace_directory(const fs::path& staged, const fs::path& target) {
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  const fs::path old = parent / (target.filename().string() + ".old" + temp_suffix());
  const bool had_old = fs::exists(target);
  if (had_old) {
    fs::rename(target, old, ec);
    if (ec) throw IoError(fmt::format("moving {} aside: {}", target.string(), ec.message()));
  }
  fs::rename(staged, target, ec);
  if (ec) {
    if (had_old) fs::rename(old, target);  // put the previous one back
    throw IoError(
        fmt::format("renaming {} to {}: {}", staged.string(), target.string(), ec.message()));
  }
  fsync_directory(parent);
  if (had_old) fs::remove_all(old, ec);
}

void append_line_durable(const fs::path& path, std::string_view line) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (fd.get() < 0) throw_errno(fmt::format("opening {} for append", path.string()));
  std::string buf(line);
  buf.push_back('\n');
  write_all(fd.get(), buf, path);
  if (::fdatasync(fd.get()) != 0) throw_errno(fmt::format("fdatasync of {}", path.string()));
}

}  // namespace attnpilot
