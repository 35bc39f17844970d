import DequeModule
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// An append-only log of one topic partition: segment files in one directory, records with gapless offsets.
///
/// - `append` writes a batch with one system call (into the page cache); `sync` makes everything appended so far
///   durable with one fdatasync. `GroupCommit` lets concurrent appenders share that fdatasync.
/// - Opening a log recovers it: every record's checksum is checked, a torn or corrupt tail of the last segment
///   is truncated to the last valid record, and a corrupt record with valid records after it (in the middle of
///   a segment) makes `open` throw `LogError.corruptRecord` rather than serve or drop data silently.
/// - After an fdatasync fails the log accepts no more appends (`LogError.syncFailed`): the kernel may have
///   dropped the dirty pages, so retrying the sync could report success for data that is gone.
public final class PartitionLog: Sendable {
    public struct Configuration: Sendable {
        /// A segment is closed and a new one started when the next batch would pass this size.
        public var segmentBytes: Int
        /// The largest record body the log accepts (and believes when recovering).
        public var maxRecordBytes: Int
        /// Sealed segments whose newest record is older than this are deleted.
        public var maxAge: Duration?
        /// Oldest sealed segments are deleted while the partition is larger than this.
        public var maxBytes: Int?
        /// Bytes between sparse index entries.
        public var indexInterval: Int
        /// Recent records kept in memory, so consumers near the head never read the file.
        public var tailCacheRecords: Int
        /// The durability primitive; tests replace it to simulate a failing disk.
        public var syncFile: @Sendable (Int32) -> Int32

        public init(
            segmentBytes: Int = 64 << 20, maxRecordBytes: Int = 2 << 20, maxAge: Duration? = nil,
            maxBytes: Int? = nil, indexInterval: Int = 4096, tailCacheRecords: Int = 16_384,
            syncFile: @escaping @Sendable (Int32) -> Int32 = { fdatasync($0) }
        ) {
            self.segmentBytes = segmentBytes
            self.maxRecordBytes = maxRecordBytes
            self.maxAge = maxAge
            self.maxBytes = maxBytes
            self.indexInterval = indexInterval
            self.tailCacheRecords = tailCacheRecords
            self.syncFile = syncFile
        }
    }

    /// What recovery found when the log opened.
    public struct Recovery: Sendable, Hashable {
        /// Bytes cut from the end of the last segment (a torn or corrupt tail), 0 when the log was clean.
        public var truncatedBytes: Int
        /// Why the tail was cut.
        public var reason: String?
    }

    struct State {
        var segments: [Segment]
        var nextOffset: Int64
        var durableOffset: Int64
        var failure: LogError?
        var closed = false
        var tail = Deque<LogRecord>()
        var maxAge: Duration?
        var maxBytes: Int?
    }

    public let directory: String
    public let configuration: Configuration
    public let recovery: Recovery
    private let state: Mutex<State>

    /// Opens (creating if needed) the log in `directory` and recovers it.
    public init(directory: String, configuration: Configuration = Configuration()) throws(LogError) {
        self.directory = directory
        self.configuration = configuration
        try PartitionLog.makeDirectory(directory)
        var segments = try PartitionLog.listSegments(directory).map { base throws(LogError) in
            try Segment(directory: directory, baseOffset: base, create: false)
        }
        var recovery = Recovery(truncatedBytes: 0, reason: nil)
        for (index, segment) in segments.enumerated() {
            if index > 0, segment.baseOffset != segments[index - 1].nextOffset {
                throw LogError(
                    .corruptRecord,
                    "\(segment.path) starts at offset \(segment.baseOffset) but the segment before it ends at "
                        + "\(segments[index - 1].nextOffset): records are missing")
            }
            let isLast = index == segments.count - 1
            if let cut = try PartitionLog.recover(segment, isLast: isLast, configuration: configuration) {
                recovery = cut
            }
        }
        if segments.isEmpty {
            segments.append(try Segment(directory: directory, baseOffset: 0, create: true))
            syncDirectory(directory)
        }
        let next = segments.last!.nextOffset
        _ = configuration.syncFile(segments.last!.fd)
        self.recovery = recovery
        state = Mutex(
            State(
                segments: segments, nextOffset: next, durableOffset: next, maxAge: configuration.maxAge,
                maxBytes: configuration.maxBytes))
    }

    // MARK: Recovery

    /// Scans a segment, rebuilding its index. Returns what was cut from a torn tail; throws on corruption that is
    /// not at the tail of the last segment.
    static func recover(_ segment: Segment, isLast: Bool, configuration: Configuration) throws(LogError) -> Recovery? {
        var expected = segment.baseOffset
        let stop = try scan(segment, from: 0, maxBody: configuration.maxRecordBytes) {
            offset, timestamp, position, size -> String? in
            guard offset == expected else { return "offset \(offset) where \(expected) was expected" }
            segment.noteRecord(
                offset: offset, timestamp: timestamp, position: position, size: size,
                indexInterval: configuration.indexInterval)
            expected += 1
            return nil
        }
        guard case .invalid(let position, let reason) = stop else { return nil }
        let followed = try validRecordExists(in: segment, after: position, expected: expected, configuration)
        guard isLast, !followed else {
            throw LogError(
                .corruptRecord,
                "\(segment.path): the record at byte \(position) (offset \(expected)) is corrupt (\(reason))"
                    + (followed
                        ? " and valid records follow it, so this is not a torn write"
                        : " in a sealed segment")
                    + "; refusing to open the partition rather than lose or serve bad data")
        }
        let cut = segment.size - position
        try segment.truncate(at: position)
        return Recovery(truncatedBytes: cut, reason: "torn tail at byte \(position) of \(segment.path): \(reason)")
    }

    /// Whether a valid record with an offset at or after `expected` starts anywhere after `position`.
    static func validRecordExists(
        in segment: Segment, after position: Int, expected: Int64, _ configuration: Configuration
    ) throws(LogError) -> Bool {
        let rest = try segment.read(at: position + 1, count: segment.size - position - 1)
        return rest.withUnsafeBytes { raw in
            var start = 0
            while start + RecordFormat.frameOverhead <= raw.count {
                defer { start += 1 }
                let candidate = UnsafeRawBufferPointer(rebasing: raw[start...])
                let offset = Int64(bitPattern: candidate.loadLittleEndian(UInt64.self, at: 8))
                guard offset >= expected, offset - expected < Int64(raw.count) else { continue }
                if case .valid = RecordFormat.check(candidate, maxBody: configuration.maxRecordBytes) { return true }
            }
            return false
        }
    }

    enum ScanStop {
        case end(Int)
        case invalid(Int, String)
        case stopped(Int)
    }

    /// Visits the valid frames of a segment from `start`: `visit(offset, timestamp, position, size)` returns a reason
    /// to treat the frame as invalid, or nil to go on. Reads the file in chunks of 1 MiB (or one whole frame).
    static func scan(
        _ segment: Segment, from start: Int, maxBody: Int, chunk: Int = 1 << 20,
        visit: (Int64, Int64, Int, Int) throws(LogError) -> String?
    ) throws(LogError) -> ScanStop {
        try scanFrames(segment, from: start, maxBody: maxBody, chunk: chunk) {
            offset, timestamp, position, size, _ throws(LogError) in
            try visit(offset, timestamp, position, size)
        }
    }

    /// `scan`, also lending each frame's bytes to the visitor (valid only during the call).
    static func scanFrames(
        _ segment: Segment, from start: Int, maxBody: Int, chunk: Int,
        visit: (Int64, Int64, Int, Int, UnsafeRawBufferPointer) throws(LogError) -> String?
    ) throws(LogError) -> ScanStop {
        var bufferStart = start
        var buffer = try segment.read(at: start, count: chunk)
        var cursor = 0
        while true {
            let position = bufferStart + cursor
            if position >= segment.size { return .end(position) }
            let checked = buffer.withUnsafeBytes { raw in
                RecordFormat.check(UnsafeRawBufferPointer(rebasing: raw[cursor...]), maxBody: maxBody)
            }
            switch checked {
            case .valid(let offset, let timestamp, let size):
                let outcome = buffer.withUnsafeBytes { raw -> Result<String?, LogError> in
                    do throws(LogError) {
                        return .success(
                            try visit(
                                offset, timestamp, position, size,
                                UnsafeRawBufferPointer(rebasing: raw[cursor..<(cursor + size)])))
                    } catch {
                        return .failure(error)
                    }
                }
                if let reason = try outcome.get() {
                    return reason == "done" ? .stopped(position) : .invalid(position, reason)
                }
                cursor += size
            case .incomplete(let needed):
                if bufferStart + buffer.count >= segment.size || position + needed > segment.size {
                    return .invalid(position, "the last record is incomplete (a torn write)")
                }
                buffer = try segment.read(at: position, count: max(chunk, needed))
                bufferStart = position
                cursor = 0
            case .invalid(let reason):
                return .invalid(position, reason)
            }
        }
    }

    static func makeDirectory(_ path: String) throws(LogError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if mkdir(prefix, 0o755) != 0, errno != EEXIST {
                throw LogError(.io, "cannot create directory \(prefix): \(errnoText())")
            }
        }
    }

    static func listSegments(_ directory: String) throws(LogError) -> [Int64] {
        guard let dir = opendir(directory) else {
            throw LogError(.io, "cannot list \(directory): \(errnoText())")
        }
        defer { closedir(dir) }
        var bases: [Int64] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard name.hasSuffix(".log"), let base = Int64(name.dropLast(4)) else { continue }
            bases.append(base)
        }
        return bases.sorted()
    }

    // MARK: Writing

    /// The offset the next appended record gets.
    public var nextOffset: Int64 { state.withLock { $0.nextOffset } }
    /// Every record below this offset is on disk (fdatasync returned).
    public var durableOffset: Int64 { state.withLock { $0.durableOffset } }
    /// The oldest offset still in the log (retention deletes older ones).
    public var startOffset: Int64 { state.withLock { $0.segments.first!.baseOffset } }
    /// Bytes of all segments.
    public var sizeInBytes: Int { state.withLock { $0.segments.reduce(0) { $0 + $1.size } } }
    /// Why the log stopped accepting writes, if it did.
    public var failure: LogError? { state.withLock { $0.failure } }

    /// Appends a batch with one write; returns the offsets it got. Nothing is durable until `sync`.
    @discardableResult
    public func append(_ inputs: [RecordInput], timestamp: Int64) throws(LogError) -> Range<Int64> {
        try state.withLock { state throws(LogError) -> Range<Int64> in
            if let failure = state.failure { throw failure }
            if state.closed { throw LogError(.closed, "the log of \(directory) is closed") }
            var bytes = 0
            for input in inputs {
                let body =
                    RecordFormat.minimumBody + (input.key?.count ?? 0) + input.headers.count
                    + input.payload.count
                guard body <= configuration.maxRecordBytes else {
                    throw LogError(
                        .recordTooLarge,
                        "a record of \(body) bytes is over the limit of \(configuration.maxRecordBytes)")
                }
                bytes += RecordFormat.prefixSize + body
            }
            if state.segments.last!.size > 0, state.segments.last!.size + bytes > configuration.segmentBytes {
                try roll(&state)
            }
            let segment = state.segments.last!
            var buffer: [UInt8] = []
            buffer.reserveCapacity(bytes)
            let first = state.nextOffset
            for (index, input) in inputs.enumerated() {
                RecordFormat.append(offset: first + Int64(index), timestamp: timestamp, input, to: &buffer)
            }
            let startPosition = segment.size
            try segment.append(buffer)
            var position = startPosition
            for (index, input) in inputs.enumerated() {
                let offset = first + Int64(index)
                let size =
                    RecordFormat.frameOverhead + (input.key?.count ?? 0) + input.headers.count
                    + input.payload.count
                segment.noteRecord(
                    offset: offset, timestamp: timestamp, position: position, size: size,
                    indexInterval: configuration.indexInterval)
                position += size
                if configuration.tailCacheRecords > 0 {
                    state.tail.append(
                        LogRecord(
                            offset: offset, timestamp: timestamp, key: input.key, headers: input.headers,
                            payload: input.payload))
                }
            }
            if state.tail.count > configuration.tailCacheRecords {
                state.tail.removeFirst(state.tail.count - configuration.tailCacheRecords)
            }
            state.nextOffset = first + Int64(inputs.count)
            return first..<state.nextOffset
        }
    }

    /// Seals the active segment (durably) and starts a new one.
    private func roll(_ state: inout State) throws(LogError) {
        let active = state.segments.last!
        if configuration.syncFile(active.fd) != 0 {
            let failure = LogError(.syncFailed, "fdatasync of \(active.path) failed: \(errnoText())")
            state.failure = failure
            throw failure
        }
        state.durableOffset = state.nextOffset
        state.segments.append(try Segment(directory: directory, baseOffset: state.nextOffset, create: true))
        syncDirectory(directory)
    }

    /// Makes every record appended so far durable (one fdatasync). After a failure the log takes no more writes.
    public func sync() throws(LogError) {
        let (segment, target) = try state.withLock { state throws(LogError) -> (Segment?, Int64) in
            if let failure = state.failure { throw failure }
            if state.closed { throw LogError(.closed, "the log of \(directory) is closed") }
            if state.durableOffset >= state.nextOffset { return (nil, state.nextOffset) }
            return (state.segments.last!, state.nextOffset)
        }
        guard let segment else { return }
        if configuration.syncFile(segment.fd) != 0 {
            let failure = LogError(
                .syncFailed, "fdatasync of \(segment.path) failed (\(errnoText())); the partition takes no more writes")
            state.withLock { $0.failure = failure }
            throw failure
        }
        state.withLock { $0.durableOffset = max($0.durableOffset, target) }
    }

    // MARK: Reading

    /// Records from `offset` on, below `limit`, at most `maxRecords` and about `maxBytes` (at least one record).
    public func read(
        from offset: Int64, upTo limit: Int64 = .max, maxRecords: Int = 1024, maxBytes: Int = 1 << 20
    ) throws(LogError) -> [LogRecord] {
        try state.withLock { state throws(LogError) -> [LogRecord] in
            let start = state.segments.first!.baseOffset
            guard offset >= start else {
                throw LogError(.offsetOutOfRange, "offset \(offset) is below the log start \(start) (retention)")
            }
            let end = min(limit, state.nextOffset)
            guard offset < end, maxRecords > 0 else { return [] }
            var records: [LogRecord] = []
            var bytes = 0
            if let first = state.tail.first?.offset, offset >= first {
                var index = Int(offset - first)
                while index < state.tail.count, state.tail[index].offset < end, records.count < maxRecords {
                    let record = state.tail[index]
                    if !records.isEmpty, bytes + record.framedSize > maxBytes { break }
                    bytes += record.framedSize
                    records.append(record)
                    index += 1
                }
                return records
            }
            var segmentIndex = state.segments.lastIndex { $0.baseOffset <= offset } ?? 0
            var done = false
            while !done, segmentIndex < state.segments.count {
                let segment = state.segments[segmentIndex]
                _ = try PartitionLog.scanFrames(
                    segment, from: segment.position(before: offset), maxBody: configuration.maxRecordBytes,
                    // Small reads: below malloc's mmap threshold, so a read costs no page faults.
                    chunk: 64 << 10
                ) { recordOffset, _, _, size, frame in
                    if recordOffset < offset { return nil }
                    if recordOffset >= end || records.count >= maxRecords
                        || (!records.isEmpty && bytes + size > maxBytes)
                    {
                        done = true
                        return "done"
                    }
                    records.append(RecordFormat.decode(frame))
                    bytes += size
                    return nil
                }
                segmentIndex += 1
            }
            return records
        }
    }

    /// The offset of the first record stamped at or after `timestamp` (ms), or `nextOffset` when there is none.
    public func offset(atOrAfter timestamp: Int64) throws(LogError) -> Int64 {
        try state.withLock { state throws(LogError) -> Int64 in
            for segment in state.segments where segment.maxTimestamp >= timestamp {
                var found: Int64?
                _ = try PartitionLog.scan(
                    segment, from: segment.position(beforeTime: timestamp), maxBody: configuration.maxRecordBytes
                ) { offset, recordTime, _, _ in
                    if recordTime >= timestamp {
                        found = offset
                        return "found"
                    }
                    return nil
                }
                if let found { return found }
            }
            return state.nextOffset
        }
    }

    // MARK: Retention and lifecycle

    /// Changes the retention limits (applied by the next `enforceRetention`).
    public func setRetention(maxAge: Duration?, maxBytes: Int?) {
        state.withLock { state in
            state.maxAge = maxAge
            state.maxBytes = maxBytes
        }
    }

    /// Deletes sealed segments past the age or size limit; returns the new start offset.
    @discardableResult
    public func enforceRetention(nowMilliseconds: Int64) -> Int64 {
        state.withLock { state in
            var total = state.segments.reduce(0) { $0 + $1.size }
            var removed = false
            while state.segments.count > 1 {
                let oldest = state.segments[0]
                let tooOld =
                    state.maxAge.map { oldest.maxTimestamp < nowMilliseconds - Int64($0 / .milliseconds(1)) } ?? false
                let tooBig = state.maxBytes.map { total > $0 } ?? false
                guard tooOld || tooBig else { break }
                unlink(oldest.path)
                total -= oldest.size
                state.segments.removeFirst()
                removed = true
            }
            if removed { syncDirectory(directory) }
            let start = state.segments[0].baseOffset
            while let first = state.tail.first, first.offset < start { state.tail.removeFirst() }
            return start
        }
    }

    /// Closes the log; later appends and syncs throw `LogError.closed`.
    public func close() {
        state.withLock { $0.closed = true }
    }

    /// Closes the log and deletes its files and directory.
    public func delete() {
        let paths = state.withLock { state -> [String] in
            state.closed = true
            return state.segments.map(\.path)
        }
        for path in paths { unlink(path) }
        rmdir(directory)
    }
}
