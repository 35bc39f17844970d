import Foundation
import HTTPTypes
import HeraldHTTP
import Hummingbird
import Synchronization
import Testing

/// An HTTP endpoint that records pushed events and answers with the status `answer` picks.
final class PushReceiver: Sendable {
    final class Calls: Sendable {
        let list = Mutex<[(id: String, attempt: String, type: String, body: String)]>([])
    }
    let received = Calls()
    let task: Task<Void, Never>
    let port: Int

    init(answer: @escaping @Sendable (_ id: String, _ attempt: Int) -> HTTPResponse.Status) async {
        let router = Router()
        let received = self.received
        router.post("/hook") { request, _ -> Response in
            var body = try await request.body.collect(upTo: 1 << 20)
            let id = request.headers[HTTPField.Name("ce-id")!] ?? "?"
            let attempt = request.headers[HTTPField.Name("herald-delivery-attempt")!] ?? "0"
            received.list.withLock {
                $0.append(
                    (
                        id, attempt, request.headers[HTTPField.Name("ce-type")!] ?? "?",
                        body.readString(length: body.readableBytes) ?? ""
                    ))
            }
            return Response(status: answer(id, Int(attempt) ?? 0))
        }
        let bound = Mutex<CheckedContinuation<Int, Never>?>(nil)
        let app = Application(
            router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { channel in bound.withLock { $0?.resume(returning: channel.localAddress?.port ?? 0) } })
        var started: Task<Void, Never>?
        port = await withCheckedContinuation { continuation in
            bound.withLock { $0 = continuation }
            started = Task { try? await app.run() }
        }
        task = started!
    }

    func stop() { task.cancel() }
}

@Suite("Push groups", .timeLimit(.minutes(2))) struct PushTests {
    @Test func pushesInBinaryModeRedeliverOnFailureAndDeadLetterAtTheLimit() async throws {
        let server = try await HTTPTestBroker()
        let receiver = await PushReceiver { id, attempt in
            switch id {
            case "flaky": attempt < 3 ? .internalServerError : .noContent
            case "poison": .badRequest
            default: .ok
            }
        }
        defer {
            receiver.stop()
            Task { await server.stop() }
        }
        let created = try await server.request(
            "PUT", "/v1/topics/orders/groups/hook",
            json: #"{"maxDeliver":3,"backoffMs":[10],"push":{"url":"http://127.0.0.1:\#(receiver.port)/hook"}}"#)
        #expect(created.status == 201, "\(created.text)")
        for id in ["ok", "flaky", "poison"] {
            let published = try await server.request(
                "POST", "/v1/topics/orders/events",
                headers: [
                    ("ce-specversion", "1.0"), ("ce-id", id), ("ce-source", "/push"), ("ce-type", "order.created"),
                    ("content-type", "application/json"),
                ], body: Array(#"{"order":"\#(id)"}"#.utf8))
            #expect(published.status == 200)
        }
        var info: [String: Any] = [:]
        for _ in 0..<300 {
            info = try await server.request("GET", "/v1/topics/orders/groups/hook").json()
            if info["acked"] as? Int == 2 && info["deadLettered"] as? Int == 1 { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(info["acked"] as? Int == 2, "ok and flaky (third attempt) are acked: \(info)")
        #expect(info["deadLettered"] as? Int == 1, "poison is dead-lettered after maxDeliver attempts")
        let calls = receiver.received.list.withLock { $0 }
        #expect(calls.filter { $0.id == "ok" }.count == 1)
        #expect(calls.filter { $0.id == "flaky" }.map(\.attempt) == ["1", "2", "3"])
        #expect(calls.filter { $0.id == "poison" }.count == 3)
        #expect(calls.first { $0.id == "ok" }?.body == #"{"order":"ok"}"#, "the body is the event's data")
        #expect(calls.allSatisfy { $0.type == "order.created" })
        let letters = try await server.request("GET", "/v1/topics/orders/dlq")
        #expect(letters.text.contains(#""id":"poison""#))
    }
}
