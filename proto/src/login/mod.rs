//! Login: text keys, operational negotiation, CHAP, and the target login state machine.
