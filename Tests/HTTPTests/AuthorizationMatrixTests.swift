import Foundation
import HTTPTypes
import Herald
import HeraldAuth
import HeraldBroker
import HeraldClient
import HeraldHTTP
import HeraldWire
import JWTKit
import NIOCore
import Testing

/// Credentials of every kind the matrix tries, signed by keys the broker trusts (or not).
struct Credentials {
    static let secret = "0123456789abcdef0123456789abcdef-herald"
    let signer = JWTKeyCollection()
    let forger = JWTKeyCollection()
    let esKey = ES256PrivateKey()

    init() async {
        await signer.add(hmac: HMACKey(from: Self.secret), digestAlgorithm: .sha256, kid: "hs")
        await signer.add(ecdsa: esKey, kid: "es")
        await forger.add(
            hmac: HMACKey(from: "another-secret-of-at-least-32-bytes!!"), digestAlgorithm: .sha256, kid: "hs")
    }

    var configuration: AuthConfiguration {
        AuthConfiguration(
            tokens: [.init(name: "ops", token: "static-ops-token", permissions: .all)],
            jwt: .init(
                hs256: [.init(kid: "hs", secret: Self.secret)],
                es256: [.init(kid: "es", publicKeyPEM: esKey.publicKey.pemRepresentation)]))
    }

    struct Claims: JWTPayload {
        var sub: SubjectClaim
        var exp: ExpirationClaim
        var nbf: NotBeforeClaim?
        var permissions: Permissions
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    func token(
        _ permissions: Permissions, kid: String = "hs", expiresIn: TimeInterval = 300, notBefore: Date? = nil,
        forged: Bool = false
    ) async throws -> String {
        let claims = Claims(
            sub: "tester", exp: ExpirationClaim(value: Date().addingTimeInterval(expiresIn)),
            nbf: notBefore.map { NotBeforeClaim(value: $0) }, permissions: permissions)
        return try await (forged ? forger : signer).sign(claims, kid: JWKIdentifier(string: kid))
    }
}

enum CredentialCase: String, CaseIterable {
    case none, malformed, badSignature, expired, notYetValid, notPermitted, permitted
}

@Suite("Authorization matrix", .timeLimit(.minutes(2))) struct AuthorizationMatrixTests {
    /// The header for a case: `permitted` holds exactly the route's permission (by pattern); `notPermitted`
    /// every other permission and the route's action on other topics only.
    static func header(
        _ credential: CredentialCase, _ requirement: RouteRequirement, _ credentials: Credentials, kid: String
    ) async throws -> String? {
        var permitted = Permissions()
        var denied = Permissions(
            publish: [TopicPattern("*")], subscribe: [TopicPattern("*")], admin: [TopicPattern("*")])
        switch requirement {
        case .none: break
        case .topic(let action):
            permitted = Self.only(action, [TopicPattern("ord*")])
            denied = Self.replacing(denied, action, with: [TopicPattern("other.*")])
        case .any(let action):
            permitted = Self.only(action, [TopicPattern("orders")])
            denied = Self.replacing(denied, action, with: [])
        }
        switch credential {
        case .none: return nil
        case .malformed: return "Bearer not-a-token-at-all"
        case .badSignature: return "Bearer " + (try await credentials.token(permitted, forged: true))
        case .expired: return "Bearer " + (try await credentials.token(permitted, kid: kid, expiresIn: -60))
        case .notYetValid:
            return "Bearer "
                + (try await credentials.token(permitted, kid: kid, notBefore: Date().addingTimeInterval(600)))
        case .notPermitted: return "Bearer " + (try await credentials.token(denied, kid: kid))
        case .permitted: return "Bearer " + (try await credentials.token(permitted, kid: kid))
        }
    }

    static func only(_ action: Action, _ patterns: [TopicPattern]) -> Permissions {
        replacing(Permissions(), action, with: patterns)
    }

    static func replacing(_ permissions: Permissions, _ action: Action, with patterns: [TopicPattern]) -> Permissions {
        var copy = permissions
        switch action {
        case .publish: copy.publish = patterns
        case .subscribe: copy.subscribe = patterns
        case .admin: copy.admin = patterns
        }
        return copy
    }

    static func expected(_ credential: CredentialCase, _ requirement: RouteRequirement) -> Set<Int>? {
        if requirement == .none { return [200] }
        switch credential {
        case .none, .malformed, .badSignature, .expired, .notYetValid: return [401]
        case .notPermitted: return [403]
        case .permitted: return nil  // anything but 401, 403 and 5xx
        }
    }

    /// Every route × every credential case, with HS256 and ES256 tokens: generated from `APIRoute.allCases`, so
    /// a new route is covered (and must behave) without touching this test.
    @Test(arguments: ["hs", "es"]) func everyRouteObeysAuthentication(kid: String) async throws {
        let credentials = await Credentials()
        let server = try await HTTPTestBroker(authenticator: try await Authenticator(credentials.configuration))
        defer { Task { await server.stop() } }
        // Something to pull, ack and describe.
        _ = try await server.request(
            "PUT", "/v1/topics/orders/groups/g", json: "{}", headers: [("authorization", "Bearer static-ops-token")])
        var failures: [String] = []
        for route in APIRoute.allCases {
            for credential in CredentialCase.allCases {
                let header = try await Self.header(credential, route.requirement, credentials, kid: kid)
                let status = try await Self.call(route, server: server, authorization: header)
                let expected = Self.expected(credential, route.requirement)
                let ok = expected.map { $0.contains(status) } ?? (status != 401 && status != 403 && status < 500)
                if !ok { failures.append("\(route.method) \(route.path) with \(credential) → \(status)") }
            }
        }
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
    }

    @Test func staticTokensAreComparedAndAWrongOneIsRefused() async throws {
        let credentials = await Credentials()
        let server = try await HTTPTestBroker(authenticator: try await Authenticator(credentials.configuration))
        defer { Task { await server.stop() } }
        let good = try await server.request(
            "GET", "/v1/topics", headers: [("authorization", "Bearer static-ops-token")])
        #expect(good.status == 200)
        let wrong = try await server.request(
            "GET", "/v1/topics", headers: [("authorization", "Bearer static-ops-tokeN")])
        #expect(wrong.status == 401)
        #expect(wrong.header("www-authenticate") == "Bearer")
        #expect(try wrong.json()["type"] as? String == "urn:herald:problem:unauthenticated")
        let scoped = try await credentials.token(Permissions(admin: [TopicPattern("a.*")]))
        _ = try await server.request(
            "PUT", "/v1/topics/a.one", json: "{}", headers: [("authorization", "Bearer static-ops-token")])
        _ = try await server.request(
            "PUT", "/v1/topics/b.two", json: "{}", headers: [("authorization", "Bearer static-ops-token")])
        let listed = try await server.request("GET", "/v1/topics", headers: [("authorization", "Bearer " + scoped)])
        #expect(listed.text.contains("a.one") && !listed.text.contains("b.two"), "lists show only covered topics")
    }

    static func call(_ route: APIRoute, server: HTTPTestBroker, authorization: String?) async throws -> Int {
        let path = route.path.replacingOccurrences(of: "{topic}", with: "orders")
            .replacingOccurrences(of: "{group}", with: "g")
        var headers: [(name: String, value: String)] = authorization.map { [("authorization", $0)] } ?? []
        var body: [UInt8] = []
        switch route {
        case .publish:
            headers += [("ce-specversion", "1.0"), ("ce-id", UUID().uuidString), ("ce-source", "/m"), ("ce-type", "t")]
        case .pull:
            headers.append(("content-type", "application/json"))
            body = Array(#"{"max":1,"waitMs":0}"#.utf8)
        case .ack, .nack:
            headers.append(("content-type", "application/json"))
            body = Array(#"{"ackIds":["0.0.1"]}"#.utf8)
        case .putTopic, .putGroup:
            headers.append(("content-type", "application/json"))
            body = Array("{}".utf8)
        case .stream:
            var request = "GET \(path) HTTP/1.1\r\nhost: x\r\n"
            for (name, value) in headers { request += "\(name): \(value)\r\n" }
            let text = try await rawExchange(port: server.httpPort, send: Array((request + "\r\n").utf8)) {
                $0.contains("\r\n\r\n")
            }
            return Int(text.split(separator: " ").dropFirst().first ?? "0") ?? 0
        default:
            break
        }
        return try await server.client.request(route.method.rawValue, server.base + path, headers: headers, body: body)
            .status
    }

    /// The TCP protocol takes the same decisions: hello without or with a bad credential closes the connection
    /// with `unauthenticated`; a valid one without the permission gets `forbidden` for that request only.
    @Test func tcpOperationsObeyTheSamePermissions() async throws {
        let credentials = await Credentials()
        let server = try await HTTPTestBroker(authenticator: try await Authenticator(credentials.configuration))
        defer { Task { await server.stop() } }
        let operations: [(RouteRequirement, Message)] = [
            (
                .topic(.publish),
                .publish(topic: "orders", events: [try BinaryEvent.encode(.init(source: "/m", type: "t"))])
            ),
            (
                .topic(.subscribe),
                .subscribe(
                    SubscribeRequest(
                        topic: "orders", group: "g", start: .earliest, ackWaitMilliseconds: 1000, maxDeliveries: 3,
                        backoffMilliseconds: [], ordered: false, maxInFlight: 1))
            ),
            (.topic(.admin), .admin(command: "topics.describe", arguments: Array(#"{"name":"orders"}"#.utf8))),
            (.any(.admin), .admin(command: "topics.list", arguments: [])),
        ]
        var failures: [String] = []
        for (requirement, message) in operations {
            for credential in CredentialCase.allCases {
                let header = try await Self.header(credential, requirement, credentials, kid: "es")
                let token = header.map { String($0.dropFirst("Bearer ".count)) }
                var hello = ByteBuffer()
                Message.hello(Hello(client: "matrix", credential: token.map { .bearer($0) } ?? .none))
                    .write(requestID: 1, to: &hello)
                var request = ByteBuffer()
                message.write(requestID: 2, to: &request)
                let reply = try await rawBytesExchange(
                    port: server.tcpPort, send: Array(hello.readableBytesView), until: { Self.frames($0).count >= 1 },
                    then: (Array(request.readableBytesView), { Self.frames($0).count >= 2 }))
                let frames = Self.frames(reply)
                let outcome: String
                switch (frames.first, frames.dropFirst().first) {
                case (.error(let error)?, _): outcome = "closed:\(error.code)"
                case (.welcome?, .error(let error)?): outcome = "refused:\(error.code)"
                case (.welcome?, _?): outcome = "ok"
                default: outcome = "nothing"
                }
                let expected: String
                switch credential {
                case .none, .malformed, .badSignature, .expired, .notYetValid: expected = "closed:unauthenticated"
                case .notPermitted: expected = "refused:forbidden"
                case .permitted: expected = "ok"
                }
                if outcome != expected { failures.append("\(requirement) with \(credential) → \(outcome)") }
            }
        }
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
    }

    /// A client whose credential is refused does not spin or wait forever: its requests fail with the reason.
    @Test func aRefusedClientFailsItsRequestsWithTheReason() async throws {
        let credentials = await Credentials()
        let server = try await HTTPTestBroker(authenticator: try await Authenticator(credentials.configuration))
        defer { Task { await server.stop() } }
        let refused = BrokerTransport(
            configuration: .init(
                port: server.tcpPort, clientName: "wrong", credential: .bearer("wrong-token"),
                unreachableTimeout: .milliseconds(500)))
        do {
            _ = try await refused.publish([CloudEvent(source: "/x", type: "t")], to: "orders")
            Issue.record("a refused client cannot publish")
        } catch let error as TransportError {
            #expect(error.code == .unavailable)
            #expect(error.message.contains("refused the handshake"), "\(error.message)")
        }
        await refused.shutdown()
        let accepted = BrokerTransport(
            configuration: .init(port: server.tcpPort, clientName: "ops", credential: .bearer("static-ops-token")))
        #expect(try await accepted.publish([CloudEvent(source: "/x", type: "t")], to: "orders").count == 1)
        await accepted.shutdown()
    }

    static func frames(_ bytes: [UInt8]) -> [Message] {
        var buffer = ByteBuffer(bytes: bytes)
        var messages: [Message] = []
        let decoder = FrameDecoder(maxFrameSize: 1 << 20)
        while let frame = try? decoder.next(&buffer), let message = try? Message(frame: frame) {
            messages.append(message)
        }
        return messages
    }
}
