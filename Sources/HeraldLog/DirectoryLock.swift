import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// An exclusive lock on a data directory (`flock` on `<directory>/LOCK`), so two processes never write one log.
/// The kernel releases it when the process dies, so a crash never leaves a stale lock behind.
public final class DirectoryLock: Sendable {
    public let path: String
    private let fd = Mutex<Int32>(-1)

    /// Creates the directory if needed and takes the lock; throws `LogError.locked` if another holder has it.
    public init(directory: String) throws(LogError) {
        try PartitionLog.makeDirectory(directory)
        path = directory + "/LOCK"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw LogError(.io, "cannot open \(path): \(errnoText())") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let reason = errno == EWOULDBLOCK ? "another broker is using \(directory)" : errnoText()
            close(fd)
            throw LogError(.locked, "cannot lock \(path): \(reason)")
        }
        self.fd.withLock { $0 = fd }
    }

    /// Releases the lock (also done when the object goes away).
    public func release() {
        fd.withLock { fd in
            if fd >= 0 { close(fd) }
            fd = -1
        }
    }

    deinit { release() }
}
