/// One record of a partition log.
public struct LogRecord: Sendable, Hashable {
    /// The record's position in its partition, from 0, without gaps.
    public var offset: Int64
    /// When the log accepted it, in milliseconds since the Unix epoch.
    public var timestamp: Int64
    /// The partition key, if any.
    public var key: [UInt8]?
    /// Opaque headers (the broker keeps an event's attributes here).
    public var headers: [UInt8]
    /// Opaque payload (the broker keeps an event's data here).
    public var payload: [UInt8]

    public init(offset: Int64, timestamp: Int64, key: [UInt8]?, headers: [UInt8], payload: [UInt8]) {
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.headers = headers
        self.payload = payload
    }

    /// Bytes this record takes in a segment file.
    public var framedSize: Int { RecordFormat.frameOverhead + (key?.count ?? 0) + headers.count + payload.count }
}

/// A record to append; the log assigns its offset and timestamp.
public struct RecordInput: Sendable {
    public var key: [UInt8]?
    public var headers: [UInt8]
    public var payload: [UInt8]

    public init(key: [UInt8]?, headers: [UInt8], payload: [UInt8]) {
        self.key = key
        self.headers = headers
        self.payload = payload
    }
}

/// The on-disk framing of a record, little-endian:
///
/// ```
/// u32 length        bytes after this field and the CRC (the body)
/// u32 crc32c        CRC-32C of the body
/// body: i64 offset | i64 timestamp (ms) | i32 key length (-1: no key) | key
///     | u32 headers length | headers | u32 payload length | payload
/// ```
enum RecordFormat {
    static let prefixSize = 8
    static let minimumBody = 8 + 8 + 4 + 4 + 4
    static let frameOverhead = prefixSize + minimumBody

    static func append(
        offset: Int64, timestamp: Int64, _ input: RecordInput, to buffer: inout [UInt8]
    ) {
        let start = buffer.count
        let bodyLength = minimumBody + (input.key?.count ?? 0) + input.headers.count + input.payload.count
        buffer.appendLittleEndian(UInt32(bodyLength))
        buffer.appendLittleEndian(UInt32(0))
        buffer.appendLittleEndian(UInt64(bitPattern: offset))
        buffer.appendLittleEndian(UInt64(bitPattern: timestamp))
        if let key = input.key {
            buffer.appendLittleEndian(UInt32(key.count))
            buffer.append(contentsOf: key)
        } else {
            buffer.appendLittleEndian(UInt32(bitPattern: -1))
        }
        buffer.appendLittleEndian(UInt32(input.headers.count))
        buffer.append(contentsOf: input.headers)
        buffer.appendLittleEndian(UInt32(input.payload.count))
        buffer.append(contentsOf: input.payload)
        let crc = buffer.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[(start + 8)...])) }
        buffer.withUnsafeMutableBytes { $0.storeBytes(of: crc.littleEndian, toByteOffset: start + 4, as: UInt32.self) }
    }

    enum Checked {
        /// A valid record: its offset, timestamp and frame size.
        case valid(offset: Int64, timestamp: Int64, size: Int)
        /// Not enough bytes for the frame; `needed` is how many the whole frame takes (8 when unknown yet).
        case incomplete(needed: Int)
        /// The bytes are not a valid record.
        case invalid(String)
    }

    /// Checks the frame at the start of `bytes` (which may hold more after it): length, checksum and layout,
    /// without copying anything.
    static func check(_ bytes: UnsafeRawBufferPointer, maxBody: Int) -> Checked {
        guard bytes.count >= prefixSize else { return .incomplete(needed: prefixSize) }
        let length = Int(bytes.loadLittleEndian(UInt32.self, at: 0))
        guard length >= minimumBody, length <= maxBody else { return .invalid("record length \(length) is impossible") }
        guard bytes.count >= prefixSize + length else { return .incomplete(needed: prefixSize + length) }
        let crc = bytes.loadLittleEndian(UInt32.self, at: 4)
        let body = UnsafeRawBufferPointer(rebasing: bytes[prefixSize..<(prefixSize + length)])
        guard CRC32C.checksum(body) == crc else { return .invalid("checksum mismatch") }
        guard layout(body) != nil else { return .invalid("field lengths do not fill the record") }
        return .valid(
            offset: Int64(bitPattern: body.loadLittleEndian(UInt64.self, at: 0)),
            timestamp: Int64(bitPattern: body.loadLittleEndian(UInt64.self, at: 8)), size: prefixSize + length)
    }

    /// The key, headers and payload ranges of a body, or nil when the lengths do not add up.
    private static func layout(_ body: UnsafeRawBufferPointer) -> (
        key: Range<Int>?, headers: Range<Int>, payload: Range<Int>
    )? {
        let length = body.count
        var cursor = 16
        let keyLength = Int32(bitPattern: body.loadLittleEndian(UInt32.self, at: cursor))
        cursor += 4
        var key: Range<Int>?
        if keyLength >= 0 {
            guard cursor + Int(keyLength) + 8 <= length else { return nil }
            key = cursor..<(cursor + Int(keyLength))
            cursor += Int(keyLength)
        } else if keyLength != -1 {
            return nil
        }
        let headersLength = Int(body.loadLittleEndian(UInt32.self, at: cursor))
        cursor += 4
        guard headersLength <= length, cursor + headersLength + 4 <= length else { return nil }
        let headers = cursor..<(cursor + headersLength)
        cursor += headersLength
        let payloadLength = Int(body.loadLittleEndian(UInt32.self, at: cursor))
        cursor += 4
        guard cursor + payloadLength == length else { return nil }
        return (key, headers, cursor..<length)
    }

    /// Materialises a frame that `check` found valid.
    static func decode(_ bytes: UnsafeRawBufferPointer) -> LogRecord {
        let length = Int(bytes.loadLittleEndian(UInt32.self, at: 0))
        let body = UnsafeRawBufferPointer(rebasing: bytes[prefixSize..<(prefixSize + length)])
        let (key, headers, payload) = layout(body)!
        return LogRecord(
            offset: Int64(bitPattern: body.loadLittleEndian(UInt64.self, at: 0)),
            timestamp: Int64(bitPattern: body.loadLittleEndian(UInt64.self, at: 8)),
            key: key.map { Array(body[$0]) }, headers: Array(body[headers]), payload: Array(body[payload]))
    }
}

extension Array where Element == UInt8 {
    @inline(__always)
    mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    func loadLittleEndian<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}
