/// The broker side of one connection as a pure state machine: the channel handler feeds it every decoded frame
/// and executes the action it returns, so the protocol rules are tested without sockets.
///
/// Rules: the first frame must be `hello` with a supported version and acceptable credentials; after `welcome`
/// any request may come, pipelined; subscription ids are unique per connection; a protocol violation closes the
/// connection after an `error` frame naming it.
public struct ServerConnectionStateMachine: Sendable {
    public enum Request: Sendable, Hashable {
        case publish(topic: String, events: [WireEvent])
        case subscribe(SubscribeRequest)
        case settle([SettleItem])
        case unsubscribe
        case admin(command: String, arguments: [UInt8])
        /// Check this credential, then report the outcome.
        case authenticate(Credential)
    }

    public enum Action: Sendable, Hashable {
        /// Send this message with this request id.
        case reply(Message, requestID: UInt32)
        /// Run this request (its response is sent with the same request id).
        case handle(Request, requestID: UInt32)
        /// Send the error, then close the connection.
        case close(WireError, requestID: UInt32)
        /// Nothing to do (the connection is already closing).
        case none
    }

    enum State: Sendable, Hashable {
        case awaitingHello
        case authenticating(client: String)
        case ready(client: String)
        case closed
    }

    private var state = State.awaitingHello
    private var subscriptions = Set<UInt32>()
    private let welcome: Welcome
    private let requiresAuthentication: Bool

    /// - Parameter requiresAuthentication: when true, `hello` is answered by `.handle(.authenticate(...))`: the
    ///   connection runs the (asynchronous) check and reports `authenticated(...)` or `authenticationFailed(...)`.
    public init(welcome: Welcome, requiresAuthentication: Bool = false) {
        self.welcome = welcome
        self.requiresAuthentication = requiresAuthentication
    }

    public var isReady: Bool { if case .ready = state { true } else { false } }
    public var openSubscriptions: Set<UInt32> { subscriptions }

    /// A frame arrived.
    public mutating func received(_ frame: Frame) -> Action {
        if case .closed = state { return .none }
        let message: Message
        do {
            message = try Message(frame: frame)
        } catch {
            return fail(error, requestID: frame.requestID)
        }
        switch (state, message) {
        case (.awaitingHello, .hello(let hello)):
            guard hello.version == heraldProtocolVersion else {
                return fail(
                    WireError(
                        .unsupportedVersion,
                        "protocol version \(hello.version) is not supported; this broker speaks \(heraldProtocolVersion)"
                    ),
                    requestID: frame.requestID)
            }
            if requiresAuthentication {
                state = .authenticating(client: hello.client)
                return .handle(.authenticate(hello.credential), requestID: frame.requestID)
            }
            state = .ready(client: hello.client)
            return .reply(.welcome(welcome), requestID: frame.requestID)
        case (.authenticating, _):
            return fail(
                WireError(.unexpectedFrame, "no request may come before the welcome, got \(frame.kind)"),
                requestID: frame.requestID)
        case (.awaitingHello, _):
            return fail(
                WireError(.unexpectedFrame, "the first frame must be hello, got \(frame.kind)"),
                requestID: frame.requestID)
        case (.ready, .hello):
            return fail(WireError(.unexpectedFrame, "hello was already received"), requestID: frame.requestID)
        case (.ready, .ping):
            return .reply(.pong, requestID: frame.requestID)
        case (.ready, .publish(let topic, let events)):
            return .handle(.publish(topic: topic, events: events), requestID: frame.requestID)
        case (.ready, .subscribe(let request)):
            guard subscriptions.insert(frame.requestID).inserted else {
                return .reply(
                    .error(WireError(.invalidRequest, "subscription id \(frame.requestID) is already in use")),
                    requestID: frame.requestID)
            }
            return .handle(.subscribe(request), requestID: frame.requestID)
        case (.ready, .settle(let items)):
            guard subscriptions.contains(frame.requestID) else {
                return .reply(
                    .error(WireError(.invalidRequest, "no subscription \(frame.requestID) on this connection")),
                    requestID: frame.requestID)
            }
            return .handle(.settle(items), requestID: frame.requestID)
        case (.ready, .unsubscribe):
            // The id stays known: deliveries the subscriber still holds may be settled after it unsubscribed.
            guard subscriptions.contains(frame.requestID) else {
                return .reply(
                    .error(WireError(.invalidRequest, "no subscription \(frame.requestID) on this connection")),
                    requestID: frame.requestID)
            }
            return .handle(.unsubscribe, requestID: frame.requestID)
        case (.ready, .admin(let command, let arguments)):
            return .handle(.admin(command: command, arguments: arguments), requestID: frame.requestID)
        case (.ready, _):
            return fail(
                WireError(.unexpectedFrame, "a client may not send \(frame.kind) frames"), requestID: frame.requestID)
        case (.closed, _):
            return .none
        }
    }

    /// The credential of the hello answered with `requestID` was accepted.
    public mutating func authenticated(requestID: UInt32) -> Action {
        guard case .authenticating(let client) = state else { return .none }
        state = .ready(client: client)
        return .reply(.welcome(welcome), requestID: requestID)
    }

    /// The credential was refused: the connection closes with this error.
    public mutating func authenticationFailed(_ error: WireError, requestID: UInt32) -> Action {
        guard case .authenticating = state else { return .none }
        return fail(error, requestID: requestID)
    }

    /// The byte stream could not be split into frames (too large, malformed).
    public mutating func decodingFailed(_ error: WireError) -> Action {
        fail(error, requestID: 0)
    }

    /// A subscription ended on the broker side (its topic was deleted, the broker is stopping).
    public mutating func subscriptionEnded(_ id: UInt32) {
        subscriptions.remove(id)
    }

    private mutating func fail(_ error: WireError, requestID: UInt32) -> Action {
        state = .closed
        return .close(error, requestID: requestID)
    }
}

/// The client side of one connection as a pure state machine: handshake, request ids, response matching.
public struct ClientConnectionStateMachine: Sendable {
    public enum Action: Sendable, Hashable {
        /// Send this frame.
        case send(Message, requestID: UInt32)
        /// The handshake finished; requests may flow.
        case ready(Welcome)
        /// The response to request `requestID`.
        case response(Message, requestID: UInt32)
        /// Deliveries for subscription `subscriptionID`.
        case deliver([WireDelivery], subscriptionID: UInt32)
        /// The connection is unusable; fail everything pending and reconnect.
        case close(WireError)
        case none
    }

    enum State: Sendable, Hashable {
        case idle
        case awaitingWelcome
        case ready(Welcome)
        case closed
    }

    private var state = State.idle
    private var pending: [UInt32: FrameKind] = [:]
    private var nextRequestID: UInt32 = 1

    public init() {}

    public var welcome: Welcome? { if case .ready(let welcome) = state { welcome } else { nil } }
    public var pendingRequests: Int { pending.count }

    /// The TCP connection is up: send hello.
    public mutating func connected(_ hello: Hello) -> Action {
        state = .awaitingWelcome
        return .send(.hello(hello), requestID: 0)
    }

    /// A new request id for a request that expects a response of kind `expects`.
    public mutating func request(expecting expects: FrameKind) -> UInt32 {
        // Request ids stay below 2^31; ids from 2^31 up are the client's own (subscriptions).
        repeat {
            nextRequestID = (nextRequestID &+ 1) & 0x7FFF_FFFF
        } while nextRequestID == 0 || pending[nextRequestID] != nil
        pending[nextRequestID] = expects
        return nextRequestID
    }

    /// Registers an id the client chose (a subscription): frames for it are accepted until `subscriptionEnded`.
    public mutating func register(_ id: UInt32, expecting: FrameKind) {
        pending[id] = expecting
    }

    /// A subscription's id stays registered until it is unsubscribed (its deliveries keep arriving).
    public mutating func subscriptionEnded(_ id: UInt32) {
        pending[id] = nil
    }

    public mutating func received(_ frame: Frame) -> Action {
        let message: Message
        do {
            message = try Message(frame: frame)
        } catch {
            return fail(error)
        }
        switch (state, message) {
        case (.awaitingWelcome, .welcome(let welcome)):
            guard welcome.version == heraldProtocolVersion else {
                return fail(WireError(.unsupportedVersion, "the broker speaks version \(welcome.version)"))
            }
            state = .ready(welcome)
            return .ready(welcome)
        case (.awaitingWelcome, .error(let error)):
            return fail(error)
        case (.awaitingWelcome, _):
            return fail(WireError(.unexpectedFrame, "expected welcome, got \(frame.kind)"))
        case (.ready, .deliver(let deliveries)):
            guard pending[frame.requestID] == .deliver else {
                return fail(WireError(.unexpectedFrame, "deliveries for unknown subscription \(frame.requestID)"))
            }
            return .deliver(deliveries, subscriptionID: frame.requestID)
        case (.ready, .pong):
            return .none
        case (.ready, .ping):
            return .send(.pong, requestID: frame.requestID)
        case (.ready, .error(let error)) where frame.requestID == 0:
            return fail(error)
        case (.ready, _):
            guard let expected = pending[frame.requestID] else {
                return fail(WireError(.unexpectedFrame, "a response to unknown request \(frame.requestID)"))
            }
            if case .error = message {
                if expected != .deliver { pending[frame.requestID] = nil }
                return .response(message, requestID: frame.requestID)
            }
            if expected == .deliver, frame.kind == .subscribed || frame.kind == .settled {
                return .response(message, requestID: frame.requestID)
            }
            guard frame.kind == expected else {
                return fail(
                    WireError(.unexpectedFrame, "request \(frame.requestID) expected \(expected), got \(frame.kind)"))
            }
            pending[frame.requestID] = nil
            return .response(message, requestID: frame.requestID)
        case (.idle, _), (.closed, _):
            return .none
        }
    }

    public mutating func fail(_ error: WireError) -> Action {
        if case .closed = state { return .none }
        state = .closed
        pending = [:]
        return .close(error)
    }
}
