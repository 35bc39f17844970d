import Herald
import HeraldLog
import NIOCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Options of a consumer group: set when the group is created, changed by `configureGroup`.
struct GroupOptions: Sendable, Hashable {
    var ackWaitMilliseconds: UInt32
    var maxDeliveries: UInt32
    var backoffMilliseconds: [UInt32]
    var ordered: Bool
    /// A push group: the broker POSTs each event to this URL (the HTTP server does the pushing).
    var pushURL: String? = nil
}

/// One change to the broker's metadata. Topics, consumer groups, settled deliveries and delivery attempts are
/// records in an internal log (`<data>/_meta`), so they recover exactly like events do.
enum JournalEntry: Sendable, Hashable {
    case topicCreated(name: String, partitions: Int, retention: TopicRetention)
    case topicDeleted(name: String)
    case topicConfigured(name: String, retention: TopicRetention)
    case groupCreated(topic: String, group: String, options: GroupOptions, cursors: [Int64])
    case groupDeleted(topic: String, group: String)
    case groupConfigured(topic: String, group: String, options: GroupOptions)
    /// Deliveries settled for good (acked or dead-lettered): never delivered to the group again.
    case settled(topic: String, group: String, positions: [Position])
    /// A delivery attempt beyond the first, so max-deliveries holds across restarts.
    case attempt(topic: String, group: String, position: Position, attempt: Int)

    func encode() -> [UInt8] {
        var buffer = ByteBuffer()
        switch self {
        case .topicCreated(let name, let partitions, let retention):
            buffer.writeInteger(UInt8(1))
            buffer.writeJournalString(name)
            buffer.writeInteger(UInt32(partitions))
            buffer.writeInteger(retention.maxAge?.milliseconds ?? -1)
            buffer.writeInteger(Int64(retention.maxBytes ?? -1))
        case .topicDeleted(let name):
            buffer.writeInteger(UInt8(2))
            buffer.writeJournalString(name)
        case .topicConfigured(let name, let retention):
            buffer.writeInteger(UInt8(7))
            buffer.writeJournalString(name)
            buffer.writeInteger(retention.maxAge?.milliseconds ?? -1)
            buffer.writeInteger(Int64(retention.maxBytes ?? -1))
        case .groupCreated(let topic, let group, let options, let cursors):
            buffer.writeInteger(UInt8(3))
            buffer.writeJournalString(topic)
            buffer.writeJournalString(group)
            buffer.writeOptions(options)
            buffer.writeInteger(UInt32(cursors.count))
            for cursor in cursors { buffer.writeInteger(cursor) }
            // Written last so that journals from before push groups still decode.
            if let url = options.pushURL { buffer.writeJournalString(url) }
        case .groupConfigured(let topic, let group, let options):
            buffer.writeInteger(UInt8(8))
            buffer.writeJournalString(topic)
            buffer.writeJournalString(group)
            buffer.writeOptions(options)
            if let url = options.pushURL { buffer.writeJournalString(url) }
        case .groupDeleted(let topic, let group):
            buffer.writeInteger(UInt8(4))
            buffer.writeJournalString(topic)
            buffer.writeJournalString(group)
        case .settled(let topic, let group, let positions):
            buffer.writeInteger(UInt8(5))
            buffer.writeJournalString(topic)
            buffer.writeJournalString(group)
            buffer.writeInteger(UInt32(positions.count))
            for position in positions { buffer.writeMultipleIntegers(UInt32(position.partition), position.offset) }
        case .attempt(let topic, let group, let position, let attempt):
            buffer.writeInteger(UInt8(6))
            buffer.writeJournalString(topic)
            buffer.writeJournalString(group)
            buffer.writeMultipleIntegers(UInt32(position.partition), position.offset, UInt32(attempt))
        }
        return Array(buffer.readableBytesView)
    }

    static func decode(_ bytes: [UInt8]) -> JournalEntry? {
        var buffer = ByteBuffer(bytes: bytes)
        guard let kind = buffer.readInteger(as: UInt8.self) else { return nil }
        switch kind {
        case 1:
            guard let name = buffer.readJournalString(), let partitions = buffer.readInteger(as: UInt32.self),
                let age = buffer.readInteger(as: Int64.self), let size = buffer.readInteger(as: Int64.self)
            else { return nil }
            return .topicCreated(
                name: name, partitions: Int(partitions),
                retention: TopicRetention(
                    maxAge: age < 0 ? nil : .milliseconds(age), maxBytes: size < 0 ? nil : Int(size)))
        case 2:
            return buffer.readJournalString().map { .topicDeleted(name: $0) }
        case 3:
            guard let topic = buffer.readJournalString(), let group = buffer.readJournalString(),
                var options = buffer.readOptions(), let count = buffer.readInteger(as: UInt32.self), count < 100_000
            else { return nil }
            var cursors: [Int64] = []
            for _ in 0..<count {
                guard let cursor = buffer.readInteger(as: Int64.self) else { return nil }
                cursors.append(cursor)
            }
            if buffer.readableBytes > 0 { options.pushURL = buffer.readJournalString() }
            return .groupCreated(topic: topic, group: group, options: options, cursors: cursors)
        case 4:
            guard let topic = buffer.readJournalString(), let group = buffer.readJournalString() else { return nil }
            return .groupDeleted(topic: topic, group: group)
        case 5:
            guard let topic = buffer.readJournalString(), let group = buffer.readJournalString(),
                let count = buffer.readInteger(as: UInt32.self), Int(count) <= buffer.readableBytes / 12
            else { return nil }
            var positions: [Position] = []
            positions.reserveCapacity(Int(count))
            for _ in 0..<count {
                guard let (partition, offset) = buffer.readMultipleIntegers(as: (UInt32, Int64).self) else {
                    return nil
                }
                positions.append(Position(partition: Int(partition), offset: offset))
            }
            return .settled(topic: topic, group: group, positions: positions)
        case 6:
            guard let topic = buffer.readJournalString(), let group = buffer.readJournalString(),
                let (partition, offset, attempt) = buffer.readMultipleIntegers(as: (UInt32, Int64, UInt32).self)
            else { return nil }
            return .attempt(
                topic: topic, group: group, position: Position(partition: Int(partition), offset: offset),
                attempt: Int(attempt))
        case 7:
            guard let name = buffer.readJournalString(), let age = buffer.readInteger(as: Int64.self),
                let size = buffer.readInteger(as: Int64.self)
            else { return nil }
            return .topicConfigured(
                name: name,
                retention: TopicRetention(
                    maxAge: age < 0 ? nil : .milliseconds(age), maxBytes: size < 0 ? nil : Int(size)))
        case 8:
            guard let topic = buffer.readJournalString(), let group = buffer.readJournalString(),
                var options = buffer.readOptions()
            else { return nil }
            if buffer.readableBytes > 0 { options.pushURL = buffer.readJournalString() }
            return .groupConfigured(topic: topic, group: group, options: options)
        default:
            return nil
        }
    }
}

extension ByteBuffer {
    /// Everything but the push URL (which goes last, optional, so old journals still decode).
    fileprivate mutating func writeOptions(_ options: GroupOptions) {
        writeMultipleIntegers(options.ackWaitMilliseconds, options.maxDeliveries)
        writeInteger(UInt32(options.backoffMilliseconds.count))
        for delay in options.backoffMilliseconds { writeInteger(delay) }
        writeInteger(UInt8(options.ordered ? 1 : 0))
    }

    fileprivate mutating func readOptions() -> GroupOptions? {
        guard let (ackWait, maxDeliveries) = readMultipleIntegers(as: (UInt32, UInt32).self),
            let backoffCount = readInteger(as: UInt32.self), backoffCount < 1000
        else { return nil }
        var backoff: [UInt32] = []
        for _ in 0..<backoffCount {
            guard let delay = readInteger(as: UInt32.self) else { return nil }
            backoff.append(delay)
        }
        guard let ordered = readInteger(as: UInt8.self) else { return nil }
        return GroupOptions(
            ackWaitMilliseconds: ackWait, maxDeliveries: maxDeliveries, backoffMilliseconds: backoff,
            ordered: ordered != 0)
    }
}

/// A record's place: partition and offset.
struct Position: Hashable, Sendable, Comparable {
    let partition: Int
    let offset: Int64

    static func < (lhs: Position, rhs: Position) -> Bool { (lhs.partition, lhs.offset) < (rhs.partition, rhs.offset) }
}

/// The metadata journal: an internal partition log of `JournalEntry` records, rewritten as a snapshot when it
/// grows (written to `_meta.next`, synced, then swapped in by rename, so a crash leaves one whole journal).
final class Journal: Sendable {
    let directory: String
    let log: PartitionLog

    init(dataDirectory: String) throws(LogError) {
        directory = dataDirectory + "/_meta"
        let next = dataDirectory + "/_meta.next"
        // A crash between the two renames of a compaction leaves only the new journal.
        if access(directory, F_OK) != 0, access(next, F_OK) == 0 { rename(next, directory) }
        Journal.removeTree(next)
        Journal.removeTree(dataDirectory + "/_meta.old")
        log = try PartitionLog(directory: directory, configuration: PartitionLog.Configuration(tailCacheRecords: 0))
    }

    /// Every entry, oldest first. Entries that do not decode are skipped (they passed their CRC, so they come from
    /// a newer broker version).
    func replay() throws(LogError) -> [JournalEntry] {
        var entries: [JournalEntry] = []
        var offset = log.startOffset
        while true {
            let records = try log.read(from: offset, maxRecords: 4096, maxBytes: 4 << 20)
            guard let last = records.last else { return entries }
            for record in records { if let entry = JournalEntry.decode(record.payload) { entries.append(entry) } }
            offset = last.offset + 1
        }
    }

    func append(_ entries: [JournalEntry]) throws(LogError) {
        guard !entries.isEmpty else { return }
        try log.append(
            entries.map { RecordInput(key: nil, headers: [], payload: $0.encode()) },
            timestamp: Int64(wallClockMilliseconds()))
    }

    /// Writes `snapshot` as a fresh journal and swaps it in; returns the new journal.
    func compacted(into snapshot: [JournalEntry], dataDirectory: String) throws(LogError) -> Journal {
        let next = dataDirectory + "/_meta.next"
        Journal.removeTree(next)
        let fresh = try PartitionLog(directory: next, configuration: PartitionLog.Configuration(tailCacheRecords: 0))
        var start = 0
        while start < snapshot.count {
            let chunk = snapshot[start..<min(snapshot.count, start + 1024)]
            try fresh.append(
                chunk.map { RecordInput(key: nil, headers: [], payload: $0.encode()) },
                timestamp: Int64(wallClockMilliseconds()))
            start += chunk.count
        }
        try fresh.sync()
        fresh.close()
        log.close()
        let old = dataDirectory + "/_meta.old"
        guard rename(directory, old) == 0, rename(next, directory) == 0 else {
            throw LogError(.io, "cannot swap in the compacted journal: \(String(cString: strerror(errno)))")
        }
        Journal.removeTree(old)
        return try Journal(dataDirectory: dataDirectory)
    }

    static func removeTree(_ path: String) {
        guard let dir = opendir(path) else { return }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard name != "." && name != ".." else { continue }
            if entry.pointee.d_type == UInt8(DT_DIR) {
                removeTree(path + "/" + name)
            } else {
                unlink(path + "/" + name)
            }
        }
        closedir(dir)
        rmdir(path)
    }
}

func wallClockMilliseconds() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_REALTIME, &spec)
    return UInt64(spec.tv_sec) * 1000 + UInt64(spec.tv_nsec) / 1_000_000
}

extension ByteBuffer {
    mutating func writeJournalString(_ text: String) {
        writeInteger(UInt32(text.utf8.count))
        writeString(text)
    }

    mutating func readJournalString() -> String? {
        guard let length = readInteger(as: UInt32.self), Int(length) <= readableBytes else { return nil }
        return readString(length: Int(length))
    }
}
