import NIOCore

/// The kinds of frame of Herald's TCP protocol (see docs/protocol.md).
public enum FrameKind: UInt8, Sendable, CaseIterable {
    case hello = 1
    case welcome = 2
    case publish = 10
    case published = 11
    case subscribe = 20
    case subscribed = 21
    case deliver = 22
    case settle = 23
    case settled = 24
    case unsubscribe = 25
    case admin = 30
    case adminResult = 31
    case error = 40
    case ping = 50
    case pong = 51
}

/// One protocol frame: `u32 length | u8 kind | u32 request id | body`, where `length` counts the bytes after
/// itself. The request id pairs a response with its request; for subscriptions it is the subscription id.
public struct Frame: Sendable, Equatable {
    public var kind: FrameKind
    public var requestID: UInt32
    public var body: ByteBuffer

    public init(kind: FrameKind, requestID: UInt32, body: ByteBuffer) {
        self.kind = kind
        self.requestID = requestID
        self.body = body
    }

    /// Bytes of the fixed header: length, kind, request id.
    public static let headerSize = 9

    public func write(to buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt32(5 + body.readableBytes))
        buffer.writeInteger(kind.rawValue)
        buffer.writeInteger(requestID)
        var body = body
        buffer.writeBuffer(&body)
    }
}

/// Splits a byte stream into frames. The announced length is checked against `maxFrameSize` before anything is
/// allocated for the frame, so a peer cannot make the other side buffer more than the limit.
public struct FrameDecoder: Sendable {
    public let maxFrameSize: Int

    public init(maxFrameSize: Int) {
        self.maxFrameSize = maxFrameSize
    }

    /// The next whole frame at the reader index of `buffer`, or nil when more bytes are needed.
    public func next(_ buffer: inout ByteBuffer) throws(WireError) -> Frame? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        guard length >= 5 else {
            throw WireError(.malformedFrame, "frame length \(length) is below the 5-byte minimum")
        }
        guard Int(length) <= maxFrameSize else {
            throw WireError(.frameTooLarge, "frame of \(length) bytes is over the limit of \(maxFrameSize)")
        }
        guard buffer.readableBytes >= 4 + Int(length) else { return nil }
        let kindByte = buffer.getInteger(at: buffer.readerIndex + 4, as: UInt8.self)!
        guard let kind = FrameKind(rawValue: kindByte) else {
            throw WireError(.malformedFrame, "unknown frame kind \(kindByte)")
        }
        buffer.moveReaderIndex(forwardBy: 5)
        let requestID = buffer.readInteger(as: UInt32.self)!
        let body = buffer.readSlice(length: Int(length) - 5)!
        return Frame(kind: kind, requestID: requestID, body: body)
    }
}

/// The NIO decoder that turns a connection's bytes into frames (server and client use the same one).
public struct FrameDecoderHandler: ByteToMessageDecoder {
    public typealias InboundOut = Frame
    let decoder: FrameDecoder

    public init(maxFrameSize: Int) {
        decoder = FrameDecoder(maxFrameSize: maxFrameSize)
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = try decoder.next(&buffer) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(frame))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws
        -> DecodingState
    {
        while try decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }
}

/// Protocol errors, each with a stable code that also travels in `error` frames.
public struct WireError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let rawValue: UInt16
        let name: String
        public var description: String { name }

        /// The bytes are not a valid frame or message.
        public static let malformedFrame = Code(rawValue: 1, name: "malformedFrame")
        /// A frame over the negotiated maximum.
        public static let frameTooLarge = Code(rawValue: 2, name: "frameTooLarge")
        /// A frame that is not allowed in the connection's state (for example a publish before the handshake).
        public static let unexpectedFrame = Code(rawValue: 3, name: "unexpectedFrame")
        /// The peer speaks a protocol version this side does not.
        public static let unsupportedVersion = Code(rawValue: 4, name: "unsupportedVersion")
        /// The credentials in the handshake are missing or wrong.
        public static let unauthenticated = Code(rawValue: 5, name: "unauthenticated")
        /// The credentials do not allow this operation.
        public static let forbidden = Code(rawValue: 6, name: "forbidden")
        /// An event is invalid (a CloudEvents attribute is missing or wrong, or it is over the size limit).
        public static let invalidEvent = Code(rawValue: 7, name: "invalidEvent")
        /// The request names something that does not exist or is invalid.
        public static let invalidRequest = Code(rawValue: 8, name: "invalidRequest")
        /// The broker refuses for now (overload, a partition that cannot write); retry later.
        public static let unavailable = Code(rawValue: 9, name: "unavailable")
        /// The ack names a delivery attempt that is no longer pending.
        public static let staleAck = Code(rawValue: 10, name: "staleAck")
        /// Anything else that went wrong on the broker.
        public static let internalError = Code(rawValue: 11, name: "internalError")

        static let all: [Code] = [
            .malformedFrame, .frameTooLarge, .unexpectedFrame, .unsupportedVersion, .unauthenticated, .forbidden,
            .invalidEvent, .invalidRequest, .unavailable, .staleAck, .internalError,
        ]

        public init(rawValue: UInt16) {
            self = Code.all.first { $0.rawValue == rawValue } ?? Code(rawValue: rawValue, name: "code\(rawValue)")
        }

        init(rawValue: UInt16, name: String) {
            self.rawValue = rawValue
            self.name = name
        }

        public static func == (lhs: Code, rhs: Code) -> Bool { lhs.rawValue == rhs.rawValue }
        public func hash(into hasher: inout Hasher) { hasher.combine(rawValue) }
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "WireError.\(code): \(message)" }

    /// Whether retrying the same request later can succeed.
    public var isRetryable: Bool { code == .unavailable }
}

extension String {
    /// An IPv4 or IPv6 literal (which TLS SNI must not carry; the certificate is checked against the address).
    package var isIPAddress: Bool {
        contains(":") || (!isEmpty && allSatisfy { $0.isNumber || $0 == "." })
    }
}
