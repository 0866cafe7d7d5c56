import Wire

/// The one registry of error codes. Every HTTP error body and every WebSocket `error` reply is built from
/// an `ApiError`, so a code always travels with the same status.
public struct ApiError: Error, Sendable, Equatable {
    public let code: Code
    public let message: String
    public var details: [String: String]
    /// Seconds for `Retry-After` (rate limiting).
    public var retryAfter: Int?

    public init(_ code: Code, _ message: String, details: [String: String] = [:], retryAfter: Int? = nil) {
        self.code = code
        self.message = message
        self.details = details
        self.retryAfter = retryAfter
    }

    public var status: Int { code.status }

    public enum Code: String, Sendable, CaseIterable {
        case badRequest = "BAD_REQUEST"
        case unknownCommand = "UNKNOWN_COMMAND"
        case invalidChannel = "INVALID_CHANNEL"
        case invalidCursor = "INVALID_CURSOR"
        case invalidBody = "INVALID_BODY"
        case alreadySubscribed = "ALREADY_SUBSCRIBED"
        case tooManySubscriptions = "TOO_MANY_SUBSCRIPTIONS"
        case unauthenticated = "UNAUTHENTICATED"
        case tokenRevoked = "TOKEN_REVOKED"
        case forbidden = "FORBIDDEN"
        case notFound = "NOT_FOUND"
        case methodNotAllowed = "METHOD_NOT_ALLOWED"
        case notAcceptable = "NOT_ACCEPTABLE"
        case idempotencyConflict = "IDEMPOTENCY_CONFLICT"
        case payloadTooLarge = "PAYLOAD_TOO_LARGE"
        case upgradeRequired = "UPGRADE_REQUIRED"
        case unsupportedMediaType = "UNSUPPORTED_MEDIA_TYPE"
        case uriTooLong = "URI_TOO_LONG"
        case headersTooLarge = "HEADERS_TOO_LARGE"
        case rateLimited = "RATE_LIMITED"
        case requestTimeout = "REQUEST_TIMEOUT"
        case internalError = "INTERNAL"
        case storeUnavailable = "STORE_UNAVAILABLE"
        case shuttingDown = "SHUTTING_DOWN"
        case notImplemented = "NOT_IMPLEMENTED"
        /// A cursor older than what the channel's retention keeps (details name the oldest position).
        case cursorExpired = "CURSOR_EXPIRED"

        public var status: Int {
            switch self {
            case .badRequest, .unknownCommand, .invalidChannel, .invalidCursor, .invalidBody, .tooManySubscriptions: 400
            case .unauthenticated, .tokenRevoked: 401
            case .forbidden: 403
            case .notFound: 404
            case .cursorExpired: 410
            case .methodNotAllowed: 405
            case .notAcceptable: 406
            case .idempotencyConflict, .alreadySubscribed: 409
            case .payloadTooLarge: 413
            case .upgradeRequired: 426
            case .unsupportedMediaType: 415
            case .uriTooLong: 414
            case .headersTooLarge: 431
            case .rateLimited: 429
            case .requestTimeout: 408
            case .internalError: 500
            case .notImplemented: 501
            case .storeUnavailable, .shuttingDown: 503
            }
        }
    }

    /// The envelope of PROTOCOL.md §4.
    public func envelope(requestId: String) -> ErrorEnvelope {
        ErrorEnvelope(code: code.rawValue, message: message, details: details, requestId: requestId)
    }

    /// The envelope of PROTOCOL.md §4 as compact JSON.
    public func envelopeJSON(requestId: String) -> String {
        envelope(requestId: requestId).json
    }
}
