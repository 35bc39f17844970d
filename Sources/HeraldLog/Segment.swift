#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// One segment file of a partition log: records from `baseOffset` on, appended at the end, with a sparse index
/// from offsets and timestamps to file positions (rebuilt by scanning the file whenever the log opens).
///
/// Mutable fields are guarded by the owning `PartitionLog`'s mutex; `fd`, `path` and `baseOffset` never change.
/// The file descriptor closes when the last reference goes, so a sync that holds a segment never races a delete.
final class Segment: @unchecked Sendable {
    struct IndexEntry {
        let offset: Int64
        let position: Int
        /// The largest record timestamp up to and including this entry's record.
        let maxTimestamp: Int64
    }

    let baseOffset: Int64
    let path: String
    let fd: Int32
    var size = 0
    var nextOffset: Int64
    var index: [IndexEntry] = []
    var maxTimestamp = Int64.min
    private var lastIndexedPosition = Int.min

    static func fileName(base: Int64) -> String {
        let digits = String(base)
        return String(repeating: "0", count: max(0, 20 - digits.count)) + digits + ".log"
    }

    init(directory: String, baseOffset: Int64, create: Bool) throws(LogError) {
        self.baseOffset = baseOffset
        self.nextOffset = baseOffset
        self.path = directory + "/" + Segment.fileName(base: baseOffset)
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0)
        let fd = Glibc.open(path, flags, 0o644)
        guard fd >= 0 else { throw LogError(.io, "cannot open segment \(path): \(errnoText())") }
        self.fd = fd
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            Glibc.close(fd)
            throw LogError(.io, "cannot stat segment \(path): \(errnoText())")
        }
        size = Int(info.st_size)
    }

    deinit { Glibc.close(fd) }

    /// Notes a record appended or recovered at `position`.
    func noteRecord(offset: Int64, timestamp: Int64, position: Int, size recordSize: Int, indexInterval: Int) {
        maxTimestamp = max(maxTimestamp, timestamp)
        if index.isEmpty || position - lastIndexedPosition >= indexInterval {
            index.append(IndexEntry(offset: offset, position: position, maxTimestamp: maxTimestamp))
            lastIndexedPosition = position
        }
        nextOffset = offset + 1
    }

    /// The file position to start scanning from to find `offset`.
    func position(before offset: Int64) -> Int {
        var low = 0
        var high = index.count - 1
        var best = 0
        while low <= high {
            let middle = (low + high) / 2
            if index[middle].offset <= offset {
                best = index[middle].position
                low = middle + 1
            } else {
                high = middle - 1
            }
        }
        return best
    }

    /// The file position to start scanning from to find the first record at or after `timestamp`.
    func position(beforeTime timestamp: Int64) -> Int {
        var best = 0
        for entry in index {
            if entry.maxTimestamp >= timestamp { break }
            best = entry.position
        }
        return best
    }

    /// Writes `bytes` at the end of the file.
    func append(_ bytes: [UInt8]) throws(LogError) {
        var written = 0
        let failure: Int32? = bytes.withUnsafeBytes { raw in
            while written < raw.count {
                let result = pwrite(fd, raw.baseAddress! + written, raw.count - written, off_t(size + written))
                if result < 0 {
                    if errno == EINTR { continue }
                    return errno
                }
                written += result
            }
            return nil
        }
        if let failure {
            // Put the file back as it was, so no half-written frame stays behind.
            _ = ftruncate(fd, off_t(size))
            throw LogError(.io, "write to \(path) failed: \(String(cString: strerror(failure)))")
        }
        size += bytes.count
    }

    /// Reads up to `count` bytes at `position` (fewer at the end of the file).
    func read(at position: Int, count: Int) throws(LogError) -> [UInt8] {
        let wanted = max(0, min(count, size - position))
        var failure: Int32?
        let bytes = [UInt8](unsafeUninitializedCapacity: wanted) { buffer, initialized in
            var done = 0
            while done < wanted {
                let result = pread(fd, buffer.baseAddress! + done, wanted - done, off_t(position + done))
                if result < 0 {
                    if errno == EINTR { continue }
                    failure = errno
                    break
                }
                if result == 0 { break }
                done += result
            }
            initialized = done
        }
        if let failure { throw LogError(.io, "read of \(path) failed: \(String(cString: strerror(failure)))") }
        return bytes
    }

    /// Cuts the file at `position` (a torn tail) and makes the cut durable.
    func truncate(at position: Int) throws(LogError) {
        guard ftruncate(fd, off_t(position)) == 0, fdatasync(fd) == 0 else {
            throw LogError(.io, "cannot truncate \(path) to \(position) bytes: \(errnoText())")
        }
        size = position
    }

    func sync() -> Int32? {
        fdatasync(fd) == 0 ? nil : errno
    }
}

func errnoText() -> String { String(cString: strerror(errno)) }

/// fsyncs a directory, so a file created or removed in it survives a crash.
func syncDirectory(_ path: String) {
    let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard fd >= 0 else { return }
    _ = fsync(fd)
    Glibc.close(fd)
}
