import NIOCore

/// NATS message headers: the `NATS/1.0` block of HPUB/HMSG, with the optional status line of server messages
/// (`503` no responders, `404` no messages, `408` request timeout, `100` idle heartbeat…). Names keep their case;
/// lookups ignore it; a name may repeat.
public struct NATSHeaders: Sendable, Hashable {
    public var fields: [(name: String, value: String)]
    public var status: Int?
    public var statusDescription: String?

    public init(_ fields: [(name: String, value: String)] = [], status: Int? = nil, statusDescription: String? = nil) {
        self.fields = fields
        self.status = status
        self.statusDescription = statusDescription
    }

    public subscript(name: String) -> String? {
        let lower = name.lowercased()
        return fields.first { $0.name.lowercased() == lower }?.value
    }

    public static func == (lhs: NATSHeaders, rhs: NATSHeaders) -> Bool {
        lhs.status == rhs.status && lhs.statusDescription == rhs.statusDescription
            && lhs.fields.map(\.name) == rhs.fields.map(\.name) && lhs.fields.map(\.value) == rhs.fields.map(\.value)
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(status)
        for field in fields {
            hasher.combine(field.name)
            hasher.combine(field.value)
        }
    }

    /// The header block as sent in HPUB: `NATS/1.0\r\n`, one `Name: value\r\n` per field, `\r\n`.
    public func encoded() throws(NATSProtocolError) -> [UInt8] {
        var text = "NATS/1.0\r\n"
        for (name, value) in fields {
            guard NATSProtocol.isToken(name), !name.contains(":"),
                !value.utf8.contains(where: { $0 == 13 || $0 == 10 })
            else {
                throw NATSProtocolError("header '\(name)' cannot be sent (names are tokens; values have no CR or LF)")
            }
            text += "\(name): \(value)\r\n"
        }
        text += "\r\n"
        return Array(text.utf8)
    }

    /// Parses a header block (`NATS/1.0[ status[ description]]\r\n` then fields, then an empty line).
    public static func parse(_ bytes: some Collection<UInt8>) throws(NATSProtocolError) -> NATSHeaders {
        let text = String(decoding: bytes, as: UTF8.self)
        var lines = text.split(separator: "\r\n", omittingEmptySubsequences: false)[...]
        guard let first = lines.popFirst(), first.hasPrefix("NATS/1.0") else {
            throw NATSProtocolError("a header block must start with NATS/1.0")
        }
        var headers = NATSHeaders()
        let status = first.dropFirst("NATS/1.0".count).drop { $0 == " " }
        if !status.isEmpty {
            let parts = status.split(separator: " ", maxSplits: 1)
            guard let code = Int(parts[0]) else { throw NATSProtocolError("bad header status line '\(first)'") }
            headers.status = code
            headers.statusDescription = parts.count > 1 ? String(parts[1]) : nil
        }
        for line in lines where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":") else {
                throw NATSProtocolError("a header line without ':'")
            }
            let name = line[..<colon].trimmingSpaces
            let value = line[line.index(after: colon)...].trimmingSpaces
            guard !name.isEmpty else { throw NATSProtocolError("a header without a name") }
            headers.fields.append((String(name), String(value)))
        }
        return headers
    }
}

extension Substring {
    var trimmingSpaces: Substring {
        var slice = self
        while slice.first == " " || slice.first == "\t" { slice.removeFirst() }
        while slice.last == " " || slice.last == "\t" { slice.removeLast() }
        return slice
    }
}

/// A message the server delivered (MSG or HMSG).
public struct NATSMessage: Sendable, Hashable {
    public var subject: String
    public var sid: UInt64
    public var replyTo: String?
    public var headers: NATSHeaders?
    public var payload: [UInt8]

    public init(subject: String, sid: UInt64, replyTo: String?, headers: NATSHeaders?, payload: [UInt8]) {
        self.subject = subject
        self.sid = sid
        self.replyTo = replyTo
        self.headers = headers
        self.payload = payload
    }
}

/// What the server sends.
public enum NATSServerOperation: Sendable, Hashable {
    /// `INFO {json}`: the server's settings (its JSON text).
    case info(String)
    case message(NATSMessage)
    case ping
    case pong
    case ok
    /// `-ERR 'text'`.
    case error(String)
}

public struct NATSProtocolError: Error, Hashable, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { "NATS protocol error: \(message)" }
}

public enum NATSProtocol {
    /// A subject or header name token: printable ASCII without spaces.
    static func isToken(_ text: String) -> Bool {
        !text.isEmpty && text.utf8.allSatisfy { $0 > 32 && $0 < 127 }
    }

    /// Subjects: tokens separated by dots, no empty token, no whitespace.
    public static func isValidSubject(_ subject: String) -> Bool {
        isToken(subject) && !subject.split(separator: ".", omittingEmptySubsequences: false).contains { $0.isEmpty }
    }
}

/// The client side of the NATS protocol as a state machine over received bytes: feed it what the socket read;
/// it returns whole operations and keeps partial ones for the next read. Control lines longer than
/// `maxControlLine`, payloads longer than `maxPayload`, unknown operations and malformed arguments are errors
/// (the connection is then closed).
public struct NATSParser: Sendable {
    enum State: Sendable {
        case controlLine
        /// A MSG/HMSG line was read; `total` payload bytes (headers included) and CRLF follow.
        case payload(subject: String, sid: UInt64, replyTo: String?, headerBytes: Int, total: Int)
    }

    var state = State.controlLine
    public let maxControlLine: Int
    public let maxPayload: Int

    public init(maxControlLine: Int = 64 << 10, maxPayload: Int = 64 << 20) {
        self.maxControlLine = maxControlLine
        self.maxPayload = maxPayload
    }

    /// The next whole operation in `buffer` (consumed), or nil when more bytes are needed.
    public mutating func next(_ buffer: inout ByteBuffer) throws(NATSProtocolError) -> NATSServerOperation? {
        switch state {
        case .controlLine:
            let view = buffer.readableBytesView
            guard let newline = view.firstIndex(of: UInt8(ascii: "\n")) else {
                if view.count > maxControlLine {
                    throw NATSProtocolError("a control line over \(maxControlLine) bytes")
                }
                return nil
            }
            var end = newline
            if end > view.startIndex, view[end - 1] == UInt8(ascii: "\r") { end -= 1 }
            let line = String(decoding: view[view.startIndex..<end], as: UTF8.self)
            buffer.moveReaderIndex(forwardBy: newline - view.startIndex + 1)
            return try controlLine(line, &buffer)
        case .payload(let subject, let sid, let replyTo, let headerBytes, let total):
            guard buffer.readableBytes >= total + 2 else { return nil }
            let bytes = buffer.readBytes(length: total)!
            guard buffer.readBytes(length: 2) == [13, 10] else {
                throw NATSProtocolError("a message payload is not followed by CRLF")
            }
            state = .controlLine
            let headers = headerBytes > 0 ? try NATSHeaders.parse(bytes[0..<headerBytes]) : nil
            return .message(
                NATSMessage(
                    subject: subject, sid: sid, replyTo: replyTo, headers: headers,
                    payload: Array(bytes[headerBytes...])))
        }
    }

    private mutating func controlLine(_ line: String, _ buffer: inout ByteBuffer) throws(NATSProtocolError)
        -> NATSServerOperation?
    {
        let space = line.firstIndex { $0 == " " || $0 == "\t" } ?? line.endIndex
        let operation = line[..<space].uppercased()
        let rest = line[space...].trimmingSpaces
        switch operation {
        case "PING": return .ping
        case "PONG": return .pong
        case "+OK": return .ok
        case "-ERR":
            var text = rest
            if text.hasPrefix("'") && text.hasSuffix("'") && text.count >= 2 { text = text.dropFirst().dropLast() }
            return .error(String(text))
        case "INFO":
            guard rest.hasPrefix("{") else { throw NATSProtocolError("INFO without a JSON object") }
            return .info(String(rest))
        case "MSG", "HMSG":
            let arguments = rest.split(whereSeparator: { $0 == " " || $0 == "\t" })
            let withHeaders = operation == "HMSG"
            let counts = withHeaders ? 2 : 1
            guard arguments.count == 2 + counts || arguments.count == 3 + counts else {
                throw NATSProtocolError("\(operation) with \(arguments.count) arguments")
            }
            guard let sid = UInt64(arguments[1]) else { throw NATSProtocolError("\(operation) with a bad sid") }
            let replyTo = arguments.count == 3 + counts ? String(arguments[2]) : nil
            let sizes = arguments.suffix(counts).map { Int($0) }
            guard let total = sizes.last!, total >= 0, total <= maxPayload else {
                throw NATSProtocolError("\(operation) with a bad or oversized payload size")
            }
            let headerBytes = withHeaders ? (sizes.first! ?? -1) : 0
            guard headerBytes >= 0, headerBytes <= total else {
                throw NATSProtocolError("HMSG whose header size is not within its total size")
            }
            state = .payload(
                subject: String(arguments[0]), sid: sid, replyTo: replyTo, headerBytes: headerBytes, total: total)
            return try next(&buffer)
        default:
            throw NATSProtocolError("unknown operation '\(operation.prefix(32))'")
        }
    }
}

/// What the client sends, written to a buffer.
public enum NATSClientOperation: Sendable {
    case connect(String)
    case publish(subject: String, replyTo: String?, headers: NATSHeaders?, payload: [UInt8])
    case subscribe(subject: String, queue: String?, sid: UInt64)
    case unsubscribe(sid: UInt64, max: Int?)
    case ping
    case pong

    public func write(to buffer: inout ByteBuffer) throws(NATSProtocolError) {
        switch self {
        case .connect(let json):
            buffer.writeString("CONNECT \(json)\r\n")
        case .publish(let subject, let replyTo, let headers, let payload):
            guard NATSProtocol.isValidSubject(subject), replyTo.map(NATSProtocol.isValidSubject) ?? true else {
                throw NATSProtocolError("invalid subject '\(subject)'")
            }
            let reply = replyTo.map { " \($0)" } ?? ""
            if let headers {
                let block = try headers.encoded()
                buffer.writeString("HPUB \(subject)\(reply) \(block.count) \(block.count + payload.count)\r\n")
                buffer.writeBytes(block)
            } else {
                buffer.writeString("PUB \(subject)\(reply) \(payload.count)\r\n")
            }
            buffer.writeBytes(payload)
            buffer.writeString("\r\n")
        case .subscribe(let subject, let queue, let sid):
            guard NATSProtocol.isValidSubject(subject) else { throw NATSProtocolError("invalid subject '\(subject)'") }
            buffer.writeString("SUB \(subject)\(queue.map { " \($0)" } ?? "") \(sid)\r\n")
        case .unsubscribe(let sid, let max):
            buffer.writeString("UNSUB \(sid)\(max.map { " \($0)" } ?? "")\r\n")
        case .ping:
            buffer.writeString("PING\r\n")
        case .pong:
            buffer.writeString("PONG\r\n")
        }
    }
}
