import Foundation
import Herald
import HeraldWire
import NIOCore
import Testing

@Suite("Wire protocol")
struct WireProtocolTests {
    static let welcome = Welcome(server: "test", maxFrameSize: 1 << 20, maxEventSize: 1 << 16)

    static func frame(_ message: Message, id: UInt32 = 7) -> Frame {
        var buffer = ByteBuffer()
        message.write(requestID: id, to: &buffer)
        return try! FrameDecoder(maxFrameSize: 1 << 24).next(&buffer)!
    }

    /// One of every message, as the seed corpus of the fuzz target and for round trips.
    static var everyMessage: [Message] {
        var event = sampleEvent(1, key: "order-1")
        event.extensions["tenant"] = .string("acme")
        event.extensions["retries"] = .integer(2)
        event.extensions["vip"] = .boolean(true)
        let wire = try! BinaryEvent.encode(event)
        return [
            .hello(Hello(client: "c", credential: .bearer("token"))), .hello(Hello(client: "c")),
            .welcome(welcome), .publish(topic: "orders", events: [wire, wire]),
            .published([WirePosition(partition: 1, offset: 42, duplicate: true)]),
            .subscribe(
                SubscribeRequest(
                    topic: "orders", group: "g", start: .time(17), ackWaitMilliseconds: 30_000, maxDeliveries: 5,
                    backoffMilliseconds: [100, 500], ordered: true, maxInFlight: 64)),
            .subscribed, .deliver([WireDelivery(partition: 0, offset: 9, attempt: 2, event: wire)]),
            .settle([
                SettleItem(settlement: .ack, partition: 0, offset: 1, attempt: 1),
                SettleItem(settlement: .nack(delayMilliseconds: 250), partition: 1, offset: 2, attempt: 3),
                SettleItem(settlement: .terminate(reason: "bad"), partition: 2, offset: 3, attempt: 1),
            ]),
            .settled(stale: [false, true]), .unsubscribe, .admin(command: "topics.list", arguments: Array("{}".utf8)),
            .adminResult(Array("[]".utf8)), .error(WireError(.invalidEvent, "no id")), .ping, .pong,
        ]
    }

    @Test func everyMessageSurvivesARoundTrip() throws {
        for message in Self.everyMessage {
            #expect(try Message(frame: Self.frame(message)) == message, "\(message.kind)")
        }
    }

    @Test func eventsKeepEveryAttributeInBinaryForm() throws {
        var event = sampleEvent(3, key: "k")
        event.subject = "s"
        event.dataschema = "https://example.com/schema"
        event.correlationid = "c"
        event.extensions["n"] = .integer(-5)
        let decoded = try BinaryEvent.decode(try BinaryEvent.encode(event))
        #expect(decoded.id == event.id && decoded.time == event.time && decoded.subject == "s")
        #expect(decoded.partitionkey == "k" && decoded.correlationid == "c" && decoded.extensions["n"] == .integer(-5))
        #expect(decoded.dataschema == event.dataschema && decoded.datacontenttype == "text/plain")
        let noData = try BinaryEvent.decode(try BinaryEvent.encode(CloudEvent(source: "s", type: "t")))
        guard case .none = noData.data else {
            Issue.record("an event without data gets none back")
            return
        }
    }

    @Test func anOversizedFrameIsRefusedFromItsLengthAlone() throws {
        var buffer = ByteBuffer()
        buffer.writeInteger(UInt32(10 << 20))  // announces 10 MiB, sends 4 bytes
        buffer.writeInteger(UInt32(0))
        #expect(throws: WireError(.frameTooLarge, "frame of 10485760 bytes is over the limit of 1048576")) {
            try FrameDecoder(maxFrameSize: 1 << 20).next(&buffer)
        }
        var partial = ByteBuffer(bytes: [0, 0, 0])
        #expect(try FrameDecoder(maxFrameSize: 1 << 20).next(&partial) == nil, "a partial header waits for more")
    }

    @Test func liesAboutCountsAndLengthsAreMalformedNotAllocated() {
        var body = ByteBuffer()
        body.writeInteger(UInt16(1))
        body.writeString("t")
        body.writeInteger(UInt32.max)  // four billion events in a few bytes
        #expect(throws: WireError.self) { try Message(frame: Frame(kind: .publish, requestID: 1, body: body)) }
        var trailing = ByteBuffer()
        trailing.writeInteger(UInt8(9))
        #expect(throws: WireError.self) { try Message(frame: Frame(kind: .ping, requestID: 1, body: trailing)) }
        #expect(throws: CloudEventError.self) { try BinaryEvent.summary([1, 200, 0]) }
    }

    @Test func theServerInsistsOnAHandshakeFirst() {
        var machine = ServerConnectionStateMachine(welcome: Self.welcome)
        guard case .close(let error, _) = machine.received(Self.frame(.publish(topic: "t", events: []))) else {
            Issue.record("a publish before hello closes the connection")
            return
        }
        #expect(error.code == .unexpectedFrame)
        #expect(
            machine.received(Self.frame(.hello(Hello(client: "late")))) == .none, "a closed connection ignores input")
    }

    @Test func theServerRefusesAnotherVersionAndBadCredentials() {
        var machine = ServerConnectionStateMachine(welcome: Self.welcome)
        guard case .close(let error, _) = machine.received(Self.frame(.hello(Hello(version: 99, client: "x")))) else {
            Issue.record("version 99 is refused")
            return
        }
        #expect(error.code == .unsupportedVersion)
        var guarded = ServerConnectionStateMachine(welcome: Self.welcome, requiresAuthentication: true)
        #expect(
            guarded.received(Self.frame(.hello(Hello(client: "x")))) == .handle(.authenticate(.none), requestID: 7))
        #expect(
            guarded.received(Self.frame(.ping))
                == .close(
                    WireError(.unexpectedFrame, "no request may come before the welcome, got ping"), requestID: 7),
            "nothing may be pipelined behind a hello that is being checked")
        var refusedMachine = ServerConnectionStateMachine(welcome: Self.welcome, requiresAuthentication: true)
        _ = refusedMachine.received(Self.frame(.hello(Hello(client: "x"))))
        guard
            case .close(let refused, _) = refusedMachine.authenticationFailed(
                WireError(.unauthenticated, "wrong token"), requestID: 7)
        else {
            Issue.record("missing credentials are refused")
            return
        }
        #expect(refused.code == .unauthenticated)
        #expect(!refusedMachine.isReady)
        var good = ServerConnectionStateMachine(welcome: Self.welcome, requiresAuthentication: true)
        #expect(
            good.received(Self.frame(.hello(Hello(client: "x", credential: .bearer("secret")))))
                == .handle(.authenticate(.bearer("secret")), requestID: 7))
        #expect(good.authenticated(requestID: 7) == .reply(.welcome(Self.welcome), requestID: 7))
        #expect(good.isReady)
    }

    @Test func theServerRoutesPipelinedRequestsAndChecksSubscriptionIDs() {
        var machine = ServerConnectionStateMachine(welcome: Self.welcome)
        _ = machine.received(Self.frame(.hello(Hello(client: "x"))))
        let request = SubscribeRequest(
            topic: "t", group: "g", start: .earliest, ackWaitMilliseconds: 1, maxDeliveries: 1, backoffMilliseconds: [],
            ordered: false, maxInFlight: 1)
        #expect(
            machine.received(Self.frame(.subscribe(request), id: 100))
                == .handle(.subscribe(request), requestID: 100))
        guard case .reply(.error(let reused), 100) = machine.received(Self.frame(.subscribe(request), id: 100)) else {
            Issue.record("a subscription id cannot be used twice")
            return
        }
        #expect(reused.code == .invalidRequest)
        guard case .reply(.error, 5) = machine.received(Self.frame(.settle([]), id: 5)) else {
            Issue.record("settling on an unknown subscription is an error, not a crash")
            return
        }
        #expect(machine.received(Self.frame(.ping, id: 3)) == .reply(.pong, requestID: 3))
        #expect(
            machine.received(Self.frame(.publish(topic: "t", events: []), id: 4))
                == .handle(.publish(topic: "t", events: []), requestID: 4))
        guard case .close = machine.received(Self.frame(.deliver([]), id: 6)) else {
            Issue.record("a client may not send deliveries")
            return
        }
    }

    @Test func theClientMatchesResponsesToRequests() {
        var client = ClientConnectionStateMachine()
        _ = client.connected(Hello(client: "c"))
        #expect(client.received(Self.frame(.welcome(Self.welcome), id: 0)) == .ready(Self.welcome))
        let publish = client.request(expecting: .published)
        let admin = client.request(expecting: .adminResult)
        client.register(0x8000_0001, expecting: .deliver)
        #expect(
            client.received(Self.frame(.adminResult([1]), id: admin)) == .response(.adminResult([1]), requestID: admin))
        #expect(
            client.received(Self.frame(.deliver([]), id: 0x8000_0001)) == .deliver([], subscriptionID: 0x8000_0001))
        #expect(
            client.received(Self.frame(.published([]), id: publish)) == .response(.published([]), requestID: publish))
        guard case .close = client.received(Self.frame(.published([]), id: publish)) else {
            Issue.record("a second response to one request is a protocol error")
            return
        }
    }

    /// Writes the fuzz target's seed corpus when HERALD_WRITE_FRAME_SEEDS names a directory.
    @Test func seedCorpus() throws {
        guard let directory = ProcessInfo.processInfo.environment["HERALD_WRITE_FRAME_SEEDS"] else { return }
        for (index, message) in Self.everyMessage.enumerated() {
            var buffer = ByteBuffer()
            message.write(requestID: UInt32(index), to: &buffer)
            try Data(buffer.readableBytesView).write(
                to: URL(fileURLWithPath: "\(directory)/\(index)-\(message.kind).bin"))
        }
    }
}
