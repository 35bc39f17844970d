import Herald
import HeraldLog

/// When the broker calls fdatasync.
public enum FsyncPolicy: Sendable, Hashable, CustomStringConvertible {
    /// A publish is acknowledged only after its records are on disk; concurrent publishes share one fdatasync.
    case always
    /// fdatasync every interval; publishes are acknowledged once written (a crash may lose the last interval).
    case interval(Duration)
    /// Never fdatasync (the OS writes back when it likes); for tests and throwaway data.
    case none

    public init?(_ text: String) {
        switch text {
        case "always": self = .always
        case "none": self = .none
        default:
            guard text.hasPrefix("interval:"), let ms = Int(text.dropFirst("interval:".count)), ms > 0 else {
                return nil
            }
            self = .interval(.milliseconds(ms))
        }
    }

    public var description: String {
        switch self {
        case .always: "always"
        case .none: "none"
        case .interval(let interval):
            "interval:\(interval.milliseconds)"
        }
    }
}

/// Everything the broker can be told, with documented defaults (docs/broker.md lists them).
public struct BrokerConfiguration: Sendable {
    /// Where topics, partitions and the metadata journal live. Default `./herald-data`.
    public var dataDirectory: String
    /// Default `.always`: fsync before ack, with group commit.
    public var fsync: FsyncPolicy
    /// Partitions of a topic created on first use. Default 4.
    public var defaultPartitions: Int
    /// Segment size. Default 64 MiB.
    public var segmentBytes: Int
    /// Retention of topics that do not set their own: age (default 7 days) and size (default unlimited).
    public var retentionAge: Duration?
    public var retentionBytes: Int?
    /// How long a (`source`, `id`) is remembered for producer dedup. Default 2 minutes; survives restarts.
    public var dedupWindow: Duration
    /// The largest event (headers + data). Default 1 MiB.
    public var maxEventBytes: Int
    /// The largest frame (a publish batch). Default 8 MiB.
    public var maxFrameBytes: Int
    /// Connections served at once; more are refused. Default 1024.
    public var maxConnections: Int
    /// Bytes queued for a slow connection before the broker stops delivering to it. Default 4 MiB.
    public var maxOutboundBytesPerConnection: Int
    /// Unacknowledged records a publisher may have in flight per partition before publishes are refused as
    /// overload (retryable). Default 65,536.
    public var maxPendingPublishes: Int
    /// How often ack deadlines, delayed redeliveries and retention are checked. Default 10 ms.
    public var tick: Duration
    /// The metadata journal is rewritten as a snapshot when it grows past this. Default 64 MiB.
    public var journalCompactionBytes: Int

    public init(
        dataDirectory: String = "./herald-data", fsync: FsyncPolicy = .always, defaultPartitions: Int = 4,
        segmentBytes: Int = 64 << 20, retentionAge: Duration? = .seconds(7 * 24 * 3600), retentionBytes: Int? = nil,
        dedupWindow: Duration = .seconds(120), maxEventBytes: Int = 1 << 20, maxFrameBytes: Int = 8 << 20,
        maxConnections: Int = 1024, maxOutboundBytesPerConnection: Int = 4 << 20, maxPendingPublishes: Int = 65_536,
        tick: Duration = .milliseconds(10), journalCompactionBytes: Int = 64 << 20
    ) {
        self.dataDirectory = dataDirectory
        self.fsync = fsync
        self.defaultPartitions = max(1, defaultPartitions)
        self.segmentBytes = segmentBytes
        self.retentionAge = retentionAge
        self.retentionBytes = retentionBytes
        self.dedupWindow = dedupWindow
        self.maxEventBytes = maxEventBytes
        self.maxFrameBytes = maxFrameBytes
        self.maxConnections = maxConnections
        self.maxOutboundBytesPerConnection = maxOutboundBytesPerConnection
        self.maxPendingPublishes = maxPendingPublishes
        self.tick = tick
        self.journalCompactionBytes = journalCompactionBytes
    }
}

/// Errors of the broker engine, mapped to wire errors by the servers.
public struct BrokerError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        public var description: String { name }
        public static let invalidEvent = Code(name: "invalidEvent")
        public static let invalidRequest = Code(name: "invalidRequest")
        public static let notFound = Code(name: "notFound")
        /// Overload or a partition that cannot write: retry later.
        public static let unavailable = Code(name: "unavailable")
        public static let shutDown = Code(name: "shutDown")
        public static let storage = Code(name: "storage")
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "BrokerError.\(code): \(message)" }
}

func logConfiguration(_ configuration: BrokerConfiguration, retention: TopicRetention) -> PartitionLog.Configuration {
    PartitionLog.Configuration(
        segmentBytes: configuration.segmentBytes, maxRecordBytes: configuration.maxEventBytes + 64 * 1024,
        maxAge: retention.maxAge, maxBytes: retention.maxBytes)
}

/// How long and how much a topic keeps.
public struct TopicRetention: Sendable, Hashable, Codable {
    public var maxAge: Duration?
    public var maxBytes: Int?

    public init(maxAge: Duration?, maxBytes: Int?) {
        self.maxAge = maxAge
        self.maxBytes = maxBytes
    }
}
