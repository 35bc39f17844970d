import Foundation
import HTTPTypes
import Herald
import HeraldAuth
import HeraldBroker
import Hummingbird
import NIOCore

/// An RFC 9457 problem: every error of the HTTP API is one, as `application/problem+json` with a stable `type`.
public struct Problem: HTTPResponseError, Sendable {
    public let status: HTTPResponse.Status
    /// A stable identifier, `urn:herald:problem:<code>`.
    public let type: String
    public let title: String
    public let detail: String
    /// Extra members (the offending CloudEvents attribute, for one).
    public var attribute: String?
    var headers: HTTPFields = [:]

    public init(_ status: HTTPResponse.Status, code: String, title: String, detail: String) {
        self.status = status
        self.type = "urn:herald:problem:" + code
        self.title = title
        self.detail = detail
    }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        var body: [String: String] = ["type": type, "title": title, "status": String(status.code), "detail": detail]
        if let attribute { body["attribute"] = attribute }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var text = String(decoding: (try? encoder.encode(body)) ?? Data(), as: UTF8.self)
        // status is a number in RFC 9457
        text = text.replacingOccurrences(of: "\"status\":\"\(status.code)\"", with: "\"status\":\(status.code)")
        var fields = headers
        fields[.contentType] = "application/problem+json"
        return Response(status: status, headers: fields, body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
    }

    static func from(_ error: BrokerError) -> Problem {
        switch error.code {
        case .invalidEvent: Problem(.badRequest, code: "invalid-event", title: "Invalid event", detail: error.message)
        case .invalidRequest:
            Problem(.badRequest, code: "invalid-request", title: "Invalid request", detail: error.message)
        case .notFound: Problem(.notFound, code: "not-found", title: "Not found", detail: error.message)
        case .unavailable:
            Problem(.serviceUnavailable, code: "unavailable", title: "Overloaded; retry later", detail: error.message)
                .with(header: .retryAfter, "1")
        case .shutDown:
            Problem(.serviceUnavailable, code: "shutting-down", title: "Shutting down", detail: error.message)
        default: Problem(.internalServerError, code: "storage", title: "Storage failure", detail: error.message)
        }
    }

    static func from(_ error: AuthError) -> Problem {
        switch error.code {
        case .unauthenticated:
            Problem(.unauthorized, code: "unauthenticated", title: "Authentication required", detail: error.message)
                .with(header: .wwwAuthenticate, "Bearer")
        case .forbidden: Problem(.forbidden, code: "forbidden", title: "Not permitted", detail: error.message)
        }
    }

    static func from(_ error: CloudEventError) -> Problem {
        var problem = Problem(
            .badRequest, code: "invalid-cloudevent", title: "Invalid CloudEvent", detail: error.message)
        problem.attribute = error.attribute
        return problem
    }

    static func invalid(_ detail: String) -> Problem {
        Problem(.badRequest, code: "invalid-request", title: "Invalid request", detail: detail)
    }

    /// Any error of a handler as a problem (HTTP errors of the framework keep their status).
    static func from(any error: any Error) -> Problem {
        switch error {
        case let problem as Problem: problem
        case let error as BrokerError: from(error)
        case let error as AuthError: from(error)
        case let error as CloudEventError: from(error)
        case let error as HTTPError where error.status == .contentTooLarge:
            Problem(.contentTooLarge, code: "too-large", title: "Body too large", detail: "\(error)")
        case let error as HTTPError:
            Problem(error.status, code: "http", title: error.status.reasonPhrase, detail: error.body ?? "\(error)")
        default: Problem(.internalServerError, code: "internal", title: "Internal error", detail: "\(error)")
        }
    }

    func with(header name: HTTPField.Name, _ value: String) -> Problem {
        var copy = self
        copy.headers[name] = value
        return copy
    }
}

/// Turns every error a handler throws into `application/problem+json`.
struct ProblemMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response)
        async throws -> Response
    {
        do {
            return try await next(request, context)
        } catch {
            return try Problem.from(any: error).response(from: request, context: context)
        }
    }
}
