import HeraldNATS
import NIOCore
import Testing

@Suite("NATS protocol parser")
struct NATSProtocolTests {
    func parseAll(_ text: String, splitEvery step: Int = .max) throws -> [NATSServerOperation] {
        var parser = NATSParser()
        var buffer = ByteBuffer()
        var operations: [NATSServerOperation] = []
        let bytes = Array(text.utf8)
        var start = 0
        while start < bytes.count {
            let end = min(bytes.count, start + step)
            buffer.writeBytes(bytes[start..<end])
            start = end
            while let operation = try parser.next(&buffer) { operations.append(operation) }
        }
        #expect(buffer.readableBytes == 0, "nothing left over")
        return operations
    }

    @Test func everyServerOperationParsesWholeAndByteByByte() throws {
        let text =
            "INFO {\"server_id\":\"x\",\"headers\":true}\r\n+OK\r\nPING\r\nPONG\r\n-ERR 'Authorization Violation'\r\n"
            + "MSG a.b 7 5\r\nhello\r\n" + "MSG a.b 7 _INBOX.r 0\r\n\r\n"
            + "HMSG c.d 9 reply.to 23 28\r\nNATS/1.0\r\nA: 1\r\nB:2\r\n\r\nhello\r\n"
            + "hmsg _INBOX.x 3 32 32\r\nNATS/1.0 408 Request Timeout\r\n\r\n\r\n"
        for step in [Int.max, 1, 3, 7] {
            let operations = try parseAll(text, splitEvery: step)
            #expect(operations.count == 9, "split every \(step)")
            #expect(operations[0] == .info("{\"server_id\":\"x\",\"headers\":true}"))
            #expect(Array(operations[1...3]) == [.ok, .ping, .pong])
            #expect(operations[4] == .error("Authorization Violation"))
            #expect(
                operations[5]
                    == .message(
                        NATSMessage(
                            subject: "a.b", sid: 7, replyTo: nil, headers: nil, payload: Array("hello".utf8))))
            #expect(
                operations[6]
                    == .message(NATSMessage(subject: "a.b", sid: 7, replyTo: "_INBOX.r", headers: nil, payload: [])))
            guard case .message(let withHeaders) = operations[7], case .message(let status) = operations[8] else {
                Issue.record("messages with headers")
                return
            }
            #expect(withHeaders.replyTo == "reply.to" && withHeaders.payload == Array("hello".utf8))
            #expect(withHeaders.headers?["a"] == "1" && withHeaders.headers?["B"] == "2")
            #expect(status.headers?.status == 408 && status.headers?.statusDescription == "Request Timeout")
            #expect(status.payload.isEmpty)
        }
    }

    @Test func malformedInputIsATypedError() {
        for bad in [
            "BOGUS x\r\n", "MSG a.b x 5\r\nhello\r\n", "MSG a.b 1\r\n", "MSG a 1 5\r\nhelloXX",
            "HMSG a 1 30 10\r\n0123456789\r\n", "HMSG a 1 5 5\r\nXATS/\r\n", "INFO nope\r\n",
        ] {
            #expect(throws: NATSProtocolError.self, "\(bad.debugDescription)") { _ = try parseAll(bad) }
        }
        var parser = NATSParser(maxControlLine: 16, maxPayload: 4)
        var long = ByteBuffer(string: String(repeating: "x", count: 40))
        #expect(throws: NATSProtocolError.self) { _ = try parser.next(&long) }
        var parser2 = NATSParser(maxControlLine: 64, maxPayload: 4)
        var big = ByteBuffer(string: "MSG a 1 5\r\nhello\r\n")
        #expect(throws: NATSProtocolError.self) { _ = try parser2.next(&big) }
    }

    @Test func clientOperationsAreWrittenAsTheProtocolSays() throws {
        var buffer = ByteBuffer()
        try NATSClientOperation.publish(subject: "a.b", replyTo: "r", headers: nil, payload: Array("hi".utf8))
            .write(to: &buffer)
        try NATSClientOperation.publish(
            subject: "a", replyTo: nil, headers: NATSHeaders([("Nats-Msg-Id", "1")]), payload: Array("x".utf8)
        ).write(to: &buffer)
        try NATSClientOperation.subscribe(subject: "a.*", queue: "q", sid: 4).write(to: &buffer)
        try NATSClientOperation.unsubscribe(sid: 4, max: nil).write(to: &buffer)
        #expect(
            String(buffer: buffer)
                == "PUB a.b r 2\r\nhi\r\nHPUB a 28 29\r\nNATS/1.0\r\nNats-Msg-Id: 1\r\n\r\nx\r\nSUB a.* q 4\r\nUNSUB 4\r\n"
        )
        #expect(throws: NATSProtocolError.self) {
            try NATSClientOperation.publish(subject: "bad subject", replyTo: nil, headers: nil, payload: [])
                .write(to: &buffer)
        }
        #expect(throws: NATSProtocolError.self) {
            try NATSClientOperation.publish(
                subject: "a", replyTo: nil, headers: NATSHeaders([("X", "line\r\nbreak")]), payload: []
            ).write(to: &buffer)
        }
    }
}
