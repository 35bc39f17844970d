/// Errors of the durable log. Each names the file and what is wrong with it.
public struct LogError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        public var description: String { name }
        /// A system call on a log file failed (open, write, read, rename, delete).
        public static let io = Code(name: "io")
        /// fdatasync failed: the partition accepts no more writes (fsync is never retried).
        public static let syncFailed = Code(name: "syncFailed")
        /// A record in the middle of a segment fails its checksum or framing; the log refuses to open.
        public static let corruptRecord = Code(name: "corruptRecord")
        /// A record is larger than the log accepts.
        public static let recordTooLarge = Code(name: "recordTooLarge")
        /// The offset asked for is not in the log (deleted by retention, or not written yet).
        public static let offsetOutOfRange = Code(name: "offsetOutOfRange")
        /// The log is closed.
        public static let closed = Code(name: "closed")
        /// Another process holds the data directory's lock.
        public static let locked = Code(name: "locked")
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "LogError.\(code): \(message)" }
}
