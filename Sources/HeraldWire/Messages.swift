import NIOCore

/// The protocol version this build speaks.
public let heraldProtocolVersion: UInt16 = 1

/// Credentials carried in the handshake (checked by the broker when authentication is on).
public enum Credential: Sendable, Hashable {
    case none
    case bearer(String)
}

public struct Hello: Sendable, Hashable {
    public var version: UInt16
    public var client: String
    public var credential: Credential

    public init(version: UInt16 = heraldProtocolVersion, client: String, credential: Credential = .none) {
        self.version = version
        self.client = client
        self.credential = credential
    }
}

public struct Welcome: Sendable, Hashable {
    public var version: UInt16
    public var server: String
    public var maxFrameSize: UInt32
    public var maxEventSize: UInt32

    public init(version: UInt16 = heraldProtocolVersion, server: String, maxFrameSize: UInt32, maxEventSize: UInt32) {
        self.version = version
        self.server = server
        self.maxFrameSize = maxFrameSize
        self.maxEventSize = maxEventSize
    }
}

/// Where a published event landed.
public struct WirePosition: Sendable, Hashable {
    public var partition: UInt32
    public var offset: Int64
    public var duplicate: Bool

    public init(partition: UInt32, offset: Int64, duplicate: Bool) {
        self.partition = partition
        self.offset = offset
        self.duplicate = duplicate
    }
}

/// Where a new consumer group starts.
public enum WireStart: Sendable, Hashable {
    case earliest
    case latest
    /// The same offset in every partition (clamped to what the partition holds).
    case offset(Int64)
    /// The first event at or after this time, in milliseconds since the epoch.
    case time(Int64)
}

extension WireStart {
    /// `earliest`, `latest`, `offset:N` or `time:MS` (milliseconds since the epoch).
    public init?(parsing text: String) {
        switch text {
        case "earliest": self = .earliest
        case "latest": self = .latest
        default:
            if text.hasPrefix("offset:"), let offset = Int64(text.dropFirst(7)) {
                self = .offset(offset)
            } else if text.hasPrefix("time:"), let time = Int64(text.dropFirst(5)) {
                self = .time(time)
            } else {
                return nil
            }
        }
    }
}

public struct SubscribeRequest: Sendable, Hashable {
    public var topic: String
    public var group: String
    public var start: WireStart
    public var ackWaitMilliseconds: UInt32
    public var maxDeliveries: UInt32
    public var backoffMilliseconds: [UInt32]
    public var ordered: Bool
    /// The credit window: deliveries this subscriber holds unsettled at most.
    public var maxInFlight: UInt32

    public init(
        topic: String, group: String, start: WireStart, ackWaitMilliseconds: UInt32, maxDeliveries: UInt32,
        backoffMilliseconds: [UInt32], ordered: Bool, maxInFlight: UInt32
    ) {
        self.topic = topic
        self.group = group
        self.start = start
        self.ackWaitMilliseconds = ackWaitMilliseconds
        self.maxDeliveries = maxDeliveries
        self.backoffMilliseconds = backoffMilliseconds
        self.ordered = ordered
        self.maxInFlight = maxInFlight
    }
}

public struct WireDelivery: Sendable, Hashable {
    public var partition: UInt32
    public var offset: Int64
    public var attempt: UInt32
    public var event: WireEvent

    public init(partition: UInt32, offset: Int64, attempt: UInt32, event: WireEvent) {
        self.partition = partition
        self.offset = offset
        self.attempt = attempt
        self.event = event
    }
}

public enum WireSettlement: Sendable, Hashable {
    case ack
    case nack(delayMilliseconds: UInt32)
    case terminate(reason: String)
}

public struct SettleItem: Sendable, Hashable {
    public var settlement: WireSettlement
    public var partition: UInt32
    public var offset: Int64
    public var attempt: UInt32

    public init(settlement: WireSettlement, partition: UInt32, offset: Int64, attempt: UInt32) {
        self.settlement = settlement
        self.partition = partition
        self.offset = offset
        self.attempt = attempt
    }
}

/// Every message of the protocol. `Frame` carries one; see docs/protocol.md for the byte layout of each.
public enum Message: Sendable, Hashable {
    case hello(Hello)
    case welcome(Welcome)
    case publish(topic: String, events: [WireEvent])
    case published([WirePosition])
    case subscribe(SubscribeRequest)
    case subscribed
    case deliver([WireDelivery])
    case settle([SettleItem])
    /// One flag per settled item: true when it was stale (no longer pending with that attempt).
    case settled(stale: [Bool])
    case unsubscribe
    /// An administrative command (`topics.list`, `topics.create`, `groups.list`, `dlq.replay`, …) with JSON arguments.
    case admin(command: String, arguments: [UInt8])
    /// The JSON result of an administrative command.
    case adminResult([UInt8])
    case error(WireError)
    case ping
    case pong

    public var kind: FrameKind {
        switch self {
        case .hello: .hello
        case .welcome: .welcome
        case .publish: .publish
        case .published: .published
        case .subscribe: .subscribe
        case .subscribed: .subscribed
        case .deliver: .deliver
        case .settle: .settle
        case .settled: .settled
        case .unsubscribe: .unsubscribe
        case .admin: .admin
        case .adminResult: .adminResult
        case .error: .error
        case .ping: .ping
        case .pong: .pong
        }
    }

    /// Writes this message as one frame.
    public func write(requestID: UInt32, to buffer: inout ByteBuffer) {
        let start = buffer.writerIndex
        buffer.writeInteger(UInt32(0))
        buffer.writeInteger(kind.rawValue)
        buffer.writeInteger(requestID)
        writeBody(to: &buffer)
        buffer.setInteger(UInt32(buffer.writerIndex - start - 4), at: start)
    }

    public func frame(requestID: UInt32, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        var body = allocator.buffer(capacity: 64)
        writeBody(to: &body)
        return Frame(kind: kind, requestID: requestID, body: body)
    }

    private func writeBody(to buffer: inout ByteBuffer) {
        switch self {
        case .hello(let hello):
            buffer.writeInteger(hello.version)
            buffer.writeShortString(hello.client)
            switch hello.credential {
            case .none: buffer.writeInteger(UInt8(0))
            case .bearer(let token):
                buffer.writeInteger(UInt8(1))
                buffer.writeLongString(token)
            }
        case .welcome(let welcome):
            buffer.writeInteger(welcome.version)
            buffer.writeShortString(welcome.server)
            buffer.writeInteger(welcome.maxFrameSize)
            buffer.writeInteger(welcome.maxEventSize)
        case .publish(let topic, let events):
            buffer.writeShortString(topic)
            buffer.writeInteger(UInt32(events.count))
            for event in events { buffer.writeEvent(event) }
        case .published(let positions):
            buffer.writeInteger(UInt32(positions.count))
            for position in positions {
                buffer.writeInteger(position.partition)
                buffer.writeInteger(position.offset)
                buffer.writeInteger(UInt8(position.duplicate ? 1 : 0))
            }
        case .subscribe(let request):
            buffer.writeShortString(request.topic)
            buffer.writeShortString(request.group)
            switch request.start {
            case .earliest: buffer.writeMultipleIntegers(UInt8(0), Int64(0))
            case .latest: buffer.writeMultipleIntegers(UInt8(1), Int64(0))
            case .offset(let offset): buffer.writeMultipleIntegers(UInt8(2), offset)
            case .time(let milliseconds): buffer.writeMultipleIntegers(UInt8(3), milliseconds)
            }
            buffer.writeInteger(request.ackWaitMilliseconds)
            buffer.writeInteger(request.maxDeliveries)
            buffer.writeInteger(UInt8(clamping: request.backoffMilliseconds.count))
            for delay in request.backoffMilliseconds.prefix(255) { buffer.writeInteger(delay) }
            buffer.writeInteger(UInt8(request.ordered ? 1 : 0))
            buffer.writeInteger(request.maxInFlight)
        case .subscribed, .unsubscribe, .ping, .pong:
            break
        case .deliver(let deliveries):
            buffer.writeInteger(UInt32(deliveries.count))
            for delivery in deliveries {
                buffer.writeMultipleIntegers(delivery.partition, delivery.offset, delivery.attempt)
                buffer.writeEvent(delivery.event)
            }
        case .settle(let items):
            buffer.writeInteger(UInt32(items.count))
            for item in items {
                switch item.settlement {
                case .ack: buffer.writeInteger(UInt8(0))
                case .nack: buffer.writeInteger(UInt8(1))
                case .terminate: buffer.writeInteger(UInt8(2))
                }
                buffer.writeMultipleIntegers(item.partition, item.offset, item.attempt)
                switch item.settlement {
                case .ack: break
                case .nack(let delay): buffer.writeInteger(delay)
                case .terminate(let reason): buffer.writeShortString(reason)
                }
            }
        case .settled(let stale):
            buffer.writeInteger(UInt32(stale.count))
            for flag in stale { buffer.writeInteger(UInt8(flag ? 1 : 0)) }
        case .admin(let command, let arguments):
            buffer.writeShortString(command)
            buffer.writeInteger(UInt32(arguments.count))
            buffer.writeBytes(arguments)
        case .adminResult(let json):
            buffer.writeInteger(UInt32(json.count))
            buffer.writeBytes(json)
        case .error(let error):
            buffer.writeInteger(error.code.rawValue)
            buffer.writeLongString(error.message)
        }
    }

    /// Parses a frame's body. Every count and length is checked against the bytes that are there.
    public init(frame: Frame) throws(WireError) {
        var body = frame.body
        self = try Message.parse(kind: frame.kind, body: &body)
        guard body.readableBytes == 0 else {
            throw WireError(.malformedFrame, "\(body.readableBytes) bytes after the end of a \(frame.kind) message")
        }
    }

    private static func parse(kind: FrameKind, body: inout ByteBuffer) throws(WireError) -> Message {
        switch kind {
        case .hello:
            let version: UInt16 = try body.readChecked()
            let client = try body.readShortString()
            let credentialKind: UInt8 = try body.readChecked()
            let credential: Credential
            switch credentialKind {
            case 0: credential = .none
            case 1: credential = .bearer(try body.readLongString())
            default: throw WireError(.malformedFrame, "unknown credential kind \(credentialKind)")
            }
            return .hello(Hello(version: version, client: client, credential: credential))
        case .welcome:
            return .welcome(
                Welcome(
                    version: try body.readChecked(), server: try body.readShortString(),
                    maxFrameSize: try body.readChecked(), maxEventSize: try body.readChecked()))
        case .publish:
            let topic = try body.readShortString()
            let count = try body.readCount(minimumItemSize: 8)
            var events: [WireEvent] = []
            events.reserveCapacity(count)
            for _ in 0..<count { events.append(try body.readEvent()) }
            return .publish(topic: topic, events: events)
        case .published:
            let count = try body.readCount(minimumItemSize: 13)
            var positions: [WirePosition] = []
            positions.reserveCapacity(count)
            for _ in 0..<count {
                positions.append(
                    WirePosition(
                        partition: try body.readChecked(), offset: try body.readChecked(),
                        duplicate: try body.readChecked(as: UInt8.self) != 0))
            }
            return .published(positions)
        case .subscribe:
            let topic = try body.readShortString()
            let group = try body.readShortString()
            let startKind: UInt8 = try body.readChecked()
            let startValue: Int64 = try body.readChecked()
            let start: WireStart
            switch startKind {
            case 0: start = .earliest
            case 1: start = .latest
            case 2: start = .offset(startValue)
            case 3: start = .time(startValue)
            default: throw WireError(.malformedFrame, "unknown start position kind \(startKind)")
            }
            let ackWait: UInt32 = try body.readChecked()
            let maxDeliveries: UInt32 = try body.readChecked()
            let backoffCount: UInt8 = try body.readChecked()
            var backoff: [UInt32] = []
            for _ in 0..<backoffCount { backoff.append(try body.readChecked()) }
            let ordered: UInt8 = try body.readChecked()
            let maxInFlight: UInt32 = try body.readChecked()
            return .subscribe(
                SubscribeRequest(
                    topic: topic, group: group, start: start, ackWaitMilliseconds: ackWait,
                    maxDeliveries: maxDeliveries, backoffMilliseconds: backoff, ordered: ordered != 0,
                    maxInFlight: maxInFlight))
        case .subscribed: return .subscribed
        case .unsubscribe: return .unsubscribe
        case .ping: return .ping
        case .pong: return .pong
        case .deliver:
            let count = try body.readCount(minimumItemSize: 24)
            var deliveries: [WireDelivery] = []
            deliveries.reserveCapacity(count)
            for _ in 0..<count {
                deliveries.append(
                    WireDelivery(
                        partition: try body.readChecked(), offset: try body.readChecked(),
                        attempt: try body.readChecked(), event: try body.readEvent()))
            }
            return .deliver(deliveries)
        case .settle:
            let count = try body.readCount(minimumItemSize: 17)
            var items: [SettleItem] = []
            items.reserveCapacity(count)
            for _ in 0..<count {
                let kind: UInt8 = try body.readChecked()
                let partition: UInt32 = try body.readChecked()
                let offset: Int64 = try body.readChecked()
                let attempt: UInt32 = try body.readChecked()
                let settlement: WireSettlement
                switch kind {
                case 0: settlement = .ack
                case 1: settlement = .nack(delayMilliseconds: try body.readChecked())
                case 2: settlement = .terminate(reason: try body.readShortString())
                default: throw WireError(.malformedFrame, "unknown settlement kind \(kind)")
                }
                items.append(SettleItem(settlement: settlement, partition: partition, offset: offset, attempt: attempt))
            }
            return .settle(items)
        case .settled:
            let count = try body.readCount(minimumItemSize: 1)
            var stale: [Bool] = []
            stale.reserveCapacity(count)
            for _ in 0..<count { stale.append(try body.readChecked(as: UInt8.self) != 0) }
            return .settled(stale: stale)
        case .admin:
            let command = try body.readShortString()
            return .admin(command: command, arguments: try body.readBlob())
        case .adminResult:
            return .adminResult(try body.readBlob())
        case .error:
            let code: UInt16 = try body.readChecked()
            return .error(WireError(WireError.Code(rawValue: code), try body.readLongString()))
        }
    }
}

extension ByteBuffer {
    mutating func writeShortString(_ text: String) {
        let bytes = Array(text.utf8.prefix(Int(UInt16.max)))
        writeInteger(UInt16(bytes.count))
        writeBytes(bytes)
    }

    mutating func writeLongString(_ text: String) {
        writeInteger(UInt32(text.utf8.count))
        writeString(text)
    }

    mutating func writeEvent(_ event: WireEvent) {
        writeInteger(UInt32(event.headers.count))
        writeBytes(event.headers)
        writeInteger(UInt32(event.data.count))
        writeBytes(event.data)
    }

    mutating func readChecked<T: FixedWidthInteger>(as: T.Type = T.self) throws(WireError) -> T {
        guard let value = readInteger(as: T.self) else {
            throw WireError(.malformedFrame, "the message ends in the middle of a field")
        }
        return value
    }

    mutating func readShortString() throws(WireError) -> String {
        let length: UInt16 = try readChecked()
        return try readText(length: Int(length))
    }

    mutating func readLongString() throws(WireError) -> String {
        let length: UInt32 = try readChecked()
        return try readText(length: Int(length))
    }

    private mutating func readText(length: Int) throws(WireError) -> String {
        guard length <= readableBytes, let bytes = readBytes(length: length) else {
            throw WireError(.malformedFrame, "a string of \(length) bytes overruns the message")
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw WireError(.malformedFrame, "a string is not valid UTF-8")
        }
        return text
    }

    mutating func readBlob() throws(WireError) -> [UInt8] {
        let length: UInt32 = try readChecked()
        guard Int(length) <= readableBytes, let bytes = readBytes(length: Int(length)) else {
            throw WireError(.malformedFrame, "a field of \(length) bytes overruns the message")
        }
        return bytes
    }

    mutating func readEvent() throws(WireError) -> WireEvent {
        WireEvent(headers: try readBlob(), data: try readBlob())
    }

    /// A count of items, refused when the items could not fit in what is left (no allocation on a lie).
    mutating func readCount(minimumItemSize: Int) throws(WireError) -> Int {
        let count = Int(try readChecked(as: UInt32.self))
        guard count <= readableBytes / minimumItemSize else {
            throw WireError(.malformedFrame, "\(count) items cannot fit in the \(readableBytes) bytes left")
        }
        return count
    }
}
