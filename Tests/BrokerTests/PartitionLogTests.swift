import Foundation
import HeraldLog
import Synchronization
import Testing

@Suite("Durable log")
struct PartitionLogTests {
    func records(_ count: Int, from start: Int = 0, size: Int = 40) -> [RecordInput] {
        (start..<(start + count)).map { index in
            RecordInput(
                key: index % 3 == 0 ? nil : Array("key-\(index % 7)".utf8), headers: Array("h\(index)".utf8),
                payload: Array(repeating: UInt8(truncatingIfNeeded: index), count: size))
        }
    }

    func segmentFiles(_ directory: String) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".log") }.sorted()
            .map { directory + "/" + $0 }
    }

    @Test func appendedRecordsReadBackAcrossSegmentsAndReopen() throws {
        let directory = TestBroker.temporaryDirectory()
        let configuration = PartitionLog.Configuration(segmentBytes: 4096, tailCacheRecords: 10)
        let log = try PartitionLog(directory: directory, configuration: configuration)
        let inputs = records(500)
        for start in stride(from: 0, to: 500, by: 50) {
            let range = try log.append(Array(inputs[start..<(start + 50)]), timestamp: Int64(1000 + start))
            #expect(range == Int64(start)..<Int64(start + 50))
        }
        try log.sync()
        #expect(log.durableOffset == 500)
        #expect(try segmentFiles(directory).count > 5, "small segments roll")
        let read = try log.read(from: 123, maxRecords: 100)
        #expect(read.map(\.offset) == Array(123..<223))
        #expect(read[0].payload == inputs[123].payload && read[0].key == inputs[123].key)
        log.close()
        let reopened = try PartitionLog(directory: directory, configuration: configuration)
        #expect(reopened.recovery.truncatedBytes == 0)
        #expect(reopened.nextOffset == 500)
        var all: [LogRecord] = []
        while all.count < 500 { all += try reopened.read(from: Int64(all.count), maxRecords: 64) }
        #expect(all.map(\.offset) == Array(0..<500))
        #expect(all.map(\.headers) == inputs.map(\.headers))
        #expect(try reopened.offset(atOrAfter: 1250) == 250, "the time index finds the first record at a time")
        #expect(try reopened.offset(atOrAfter: 99_999) == 500)
    }

    /// A log of `count` records, synced and closed: its directory and its one segment file.
    func closedLog(of count: Int) throws -> (directory: String, file: String) {
        let directory = TestBroker.temporaryDirectory()
        let log = try PartitionLog(directory: directory)
        try log.append(records(count), timestamp: 1)
        try log.sync()
        log.close()
        return (directory, try segmentFiles(directory)[0])
    }

    @Test func aTornTailIsTruncatedToTheLastValidRecord() throws {
        let (directory, file) = try closedLog(of: 10)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: file))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data([0x40, 0, 0, 0, 1, 2, 3]))  // half of a frame
        try handle.close()
        let reopened = try PartitionLog(directory: directory)
        #expect(reopened.recovery.truncatedBytes == 7)
        #expect(reopened.nextOffset == 10)
        try reopened.append(records(1), timestamp: 2)
        #expect(try reopened.read(from: 10).first?.offset == 10, "appends continue after the cut")
    }

    @Test func aBitFlipInTheLastRecordIsCutAndOneInTheMiddleIsRefused() throws {
        for (record, refused) in [(9, false), (4, true)] {
            let (directory, file) = try closedLog(of: 10)
            var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
            let frame = bytes.count / 10
            bytes[record * frame + frame / 2] ^= 0x10
            try Data(bytes).write(to: URL(fileURLWithPath: file))
            if refused {
                #expect(throws: LogError.self) { try PartitionLog(directory: directory) }
                do {
                    _ = try PartitionLog(directory: directory)
                } catch {
                    #expect(error.code == .corruptRecord)
                    #expect(error.message.contains("valid records follow"))
                }
            } else {
                let reopened = try PartitionLog(directory: directory)
                #expect(reopened.nextOffset == 9)
                #expect(try reopened.read(from: 0, maxRecords: 100).count == 9)
            }
        }
    }

    @Test func damagedSegmentsNeverServeABadRecord() throws {
        // Every kind of damage at many places: recovery either refuses or serves only records that were written.
        let damages: [(String, (inout [UInt8], Int) -> Void)] = [
            ("zeroed block", { bytes, at in for i in at..<min(bytes.count, at + 512) { bytes[i] = 0 } }),
            ("bit flip", { bytes, at in bytes[at] ^= 0x01 }),
            ("truncated", { bytes, at in bytes.removeSubrange(at...) }),
            ("garbage", { bytes, at in for i in at..<min(bytes.count, at + 64) { bytes[i] = UInt8(i & 0xFF) } }),
        ]
        var opened = 0
        var refused = 0
        for (name, damage) in damages {
            for (fraction, lastSegment) in [0.0, 0.1, 0.33, 0.5, 0.77, 0.95, 0.999].flatMap({
                [($0, false), ($0, true)]
            }) {
                let directory = TestBroker.temporaryDirectory()
                let log = try PartitionLog(
                    directory: directory, configuration: PartitionLog.Configuration(segmentBytes: 8192))
                let inputs = records(300)
                try log.append(inputs, timestamp: 7)
                try log.sync()
                log.close()
                let files = try segmentFiles(directory)
                let file = lastSegment ? files[files.count - 1] : files[files.count / 2]
                var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
                damage(&bytes, Int(Double(bytes.count - 1) * fraction))
                try Data(bytes).write(to: URL(fileURLWithPath: file))
                guard let reopened = try? PartitionLog(directory: directory) else {
                    refused += 1
                    continue
                }
                opened += 1
                var offset = reopened.startOffset
                while offset < reopened.nextOffset {
                    let read = try reopened.read(from: offset, maxRecords: 50)
                    #expect(!read.isEmpty, "\(name) at \(fraction): the log serves what it claims")
                    for record in read {
                        let original = inputs[Int(record.offset)]
                        #expect(
                            record.payload == original.payload && record.headers == original.headers,
                            "\(name) at \(fraction): record \(record.offset) is what was written")
                    }
                    guard let last = read.last else { break }
                    offset = last.offset + 1
                }
            }
        }
        #expect(opened > 10 && refused > 10, "damage at the tail is cut, in the middle refused (\(opened)/\(refused))")
    }

    @Test func aFailedFsyncStopsWritesForGood() throws {
        let failing = Atomic<Bool>(false)
        let configuration = PartitionLog.Configuration(syncFile: { fd in
            failing.load(ordering: .relaxed) ? -1 : fdatasync(fd)
        })
        let log = try PartitionLog(directory: TestBroker.temporaryDirectory(), configuration: configuration)
        try log.append(records(3), timestamp: 1)
        try log.sync()
        try log.append(records(3), timestamp: 1)
        failing.store(true, ordering: .relaxed)
        #expect(throws: LogError.self) { try log.sync() }
        failing.store(false, ordering: .relaxed)
        #expect(log.failure?.code == .syncFailed)
        #expect(throws: LogError.self, "no retry of fsync: the next sync fails too") { try log.sync() }
        #expect(throws: LogError.self, "and no more appends") { try log.append(records(1), timestamp: 1) }
        #expect(log.durableOffset == 3)
    }

    @Test func retentionDeletesOldSegmentsButNeverTheActiveOne() throws {
        let directory = TestBroker.temporaryDirectory()
        let log = try PartitionLog(
            directory: directory,
            configuration: PartitionLog.Configuration(segmentBytes: 2048, maxAge: .seconds(60), maxBytes: 8192))
        try log.append(records(100), timestamp: 0)
        try log.append(records(100), timestamp: 1_000_000)
        let before = try segmentFiles(directory).count
        let start = log.enforceRetention(nowMilliseconds: 1_000_000)
        #expect(start > 0)
        #expect(try segmentFiles(directory).count < before)
        #expect(log.sizeInBytes <= 8192 + 2048)
        #expect(throws: LogError.self) { try log.read(from: 0) }
        #expect(try log.read(from: start).first?.offset == start)
        log.enforceRetention(nowMilliseconds: .max / 2)
        #expect(try segmentFiles(directory).count == 1, "the active segment stays")
    }

    @Test func oversizedRecordsAreRefusedBeforeAnythingIsWritten() throws {
        let log = try PartitionLog(
            directory: TestBroker.temporaryDirectory(), configuration: PartitionLog.Configuration(maxRecordBytes: 1000))
        let big = RecordInput(key: nil, headers: [], payload: Array(repeating: 1, count: 2000))
        #expect(throws: LogError.self) { try log.append(records(2) + [big], timestamp: 1) }
        #expect(log.nextOffset == 0)
    }

    @Test func concurrentAppendersShareFsyncs() async throws {
        let counter = Atomic<Int>(0)
        let log = try PartitionLog(
            directory: TestBroker.temporaryDirectory(),
            configuration: PartitionLog.Configuration(syncFile: { fd in
                counter.add(1, ordering: .relaxed)
                return fdatasync(fd)
            }))
        let commit = GroupCommit()
        let before = counter.load(ordering: .relaxed)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<200 {
                group.addTask {
                    let range = try log.append(self.records(1, from: index), timestamp: 1)
                    try await commit.waitDurable(log, through: range.upperBound)
                    #expect(log.durableOffset >= range.upperBound)
                }
            }
            try await group.waitForAll()
        }
        let syncs = counter.load(ordering: .relaxed) - before
        #expect(syncs < 200, "200 appends took \(syncs) fsyncs")
        #expect(log.durableOffset == 200)
    }
}
